//! The hashes of a stream's newest stored records, kept so a resend can be
//! told from a fork without reading the disk: a ring of raw SHA-256
//! digests for consecutive positions, oldest dropped first.
//!
//! A `HashMap<u64, String>` of hex hashes cost ≈115 bytes a position and was
//! cleared whole when full (right after which a rewritten record went
//! unnoticed); this costs 32 and always covers the newest positions. A
//! sealed stream keeps only its tail: the only resend it can still get is
//! a sender retrying its last batches.

use std::collections::VecDeque;

/// Positions a stream being written keeps (2 MiB of digests).
#[cfg(not(test))]
pub const OPEN_WINDOW: usize = 65_536;
/// Fewer in unit tests, which fill the window.
#[cfg(test)]
pub const OPEN_WINDOW: usize = 512;
/// Positions a sealed stream keeps.
pub const SEALED_WINDOW: usize = 256;

/// What the window knows of a stored position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Its hash is the one sent.
    Same,
    /// Another record was stored there.
    Different,
    /// Older than the window (or before an anchor): not known here.
    Unknown,
}

/// The newest stored positions' digests.
#[derive(Debug, Default)]
pub struct RecentHashes {
    /// Position of `digests[0]`.
    first: u64,
    digests: VecDeque<[u8; 32]>,
}

impl RecentHashes {
    /// Keeps `hash` (hex, as records carry it) for `seq`. A position that
    /// does not follow the newest kept (a gap) starts the window over.
    pub fn push(&mut self, seq: u64, hash: &str, window: usize) {
        let Some(digest) = digest(hash) else {
            // Stored records' hashes were checked when they were parsed;
            // one that does not decode cannot be compared: start over.
            self.digests.clear();
            return;
        };
        if self.digests.is_empty() || seq != self.first + self.digests.len() as u64 {
            self.digests.clear();
            self.first = seq;
        }
        self.digests.push_back(digest);
        self.trim(window);
    }

    /// Keeps only the newest `window` positions, and frees what it drops.
    pub fn shrink_to(&mut self, window: usize) {
        self.trim(window);
        self.digests.shrink_to_fit();
    }

    fn trim(&mut self, window: usize) {
        while self.digests.len() > window {
            self.digests.pop_front();
            self.first += 1;
        }
    }

    /// Whether the record stored at `seq` has `hash`.
    pub fn check(&self, seq: u64, hash: &str) -> Known {
        let Some(index) = seq.checked_sub(self.first).filter(|i| *i < self.digests.len() as u64) else {
            return Known::Unknown;
        };
        if digest(hash).as_ref() == Some(&self.digests[index as usize]) { Known::Same } else { Known::Different }
    }

    /// The hex hash kept for `seq`, for an incident's detail.
    pub fn hex(&self, seq: u64) -> Option<String> {
        let index = seq.checked_sub(self.first)?;
        self.digests.get(usize::try_from(index).ok()?).map(hex::encode)
    }

    /// How many positions are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.digests.len()
    }
}

fn digest(hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hash, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u64) -> String {
        format!("{n:064x}")
    }

    #[test]
    fn the_newest_positions_are_kept_and_older_ones_are_unknown() {
        let mut recent = RecentHashes::default();
        for seq in 1..=10 {
            recent.push(seq, &hash(seq), 4);
        }
        assert_eq!(recent.len(), 4);
        assert_eq!(recent.check(10, &hash(10)), Known::Same);
        assert_eq!(recent.check(7, &hash(7)), Known::Same);
        assert_eq!(recent.check(7, &hash(8)), Known::Different);
        assert_eq!(recent.check(7, "not hex"), Known::Different);
        assert_eq!(recent.check(6, &hash(6)), Known::Unknown);
        assert_eq!(recent.check(11, &hash(11)), Known::Unknown);
        assert_eq!(recent.hex(9), Some(hash(9)));
    }

    #[test]
    fn a_gap_starts_the_window_over() {
        let mut recent = RecentHashes::default();
        recent.push(1, &hash(1), 8);
        recent.push(2, &hash(2), 8);
        recent.push(5, &hash(5), 8);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.check(2, &hash(2)), Known::Unknown);
        recent.push(6, &hash(6), 8);
        assert_eq!(recent.check(5, &hash(5)), Known::Same);
        assert_eq!(recent.check(6, &hash(6)), Known::Same);
    }

    #[test]
    fn shrinking_keeps_the_tail() {
        let mut recent = RecentHashes::default();
        for seq in 1..=100 {
            recent.push(seq, &hash(seq), 100);
        }
        recent.shrink_to(3);
        assert_eq!(recent.len(), 3);
        assert_eq!(recent.check(100, &hash(100)), Known::Same);
        assert_eq!(recent.check(98, &hash(98)), Known::Same);
        assert_eq!(recent.check(97, &hash(97)), Known::Unknown);
    }
}
