//! Signed checkpoints: the collector's periodic statement "stream S held
//! records through seq N, ending in hash H, at time T", signed with an
//! Ed25519 key only the collector holds (in the spirit of CloudTrail's
//! digest files). A chain proves order; a checkpoint also proves the tail:
//! records deleted or rewritten after it no longer match what was signed.
//!
//! ```text
//!   <stream dir>/checkpoints.jsonl
//!   {"stream":…,"seq":N,"hash":H,"time":T,"key":<public key hex>,"signature":<hex>}
//!   signature = Ed25519(key, "mcp-warden checkpoint v1\n" ‖ {"stream":…,"seq":N,"hash":H,"time":T})
//! ```

use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The checkpoint file of a stream directory.
pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";
const DOMAIN: &[u8] = b"mcp-warden checkpoint v1\n";

/// One signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The stream.
    pub stream: String,
    /// Last record covered.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// When the collector signed (RFC 3339).
    pub time: String,
    /// The signer's public key (hex).
    pub key: String,
    /// Ed25519 signature (hex).
    pub signature: String,
}

#[derive(Serialize)]
struct Signed<'a> {
    stream: &'a str,
    seq: u64,
    hash: &'a str,
    time: &'a str,
}

fn signed_bytes(stream: &str, seq: u64, hash: &str, time: &str) -> Vec<u8> {
    let mut bytes = DOMAIN.to_vec();
    // Serializing a plain struct cannot fail.
    bytes.extend(serde_json::to_vec(&Signed { stream, seq, hash, time }).unwrap_or_default());
    bytes
}

/// The collector's signing key.
pub struct Signer(SigningKey);

impl Signer {
    /// From a file holding the 32-byte seed as 64 hex digits.
    pub fn from_file(path: &Path) -> Result<Signer, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("{}: expected an Ed25519 seed as 64 hex digits", path.display()))?;
        Ok(Signer(SigningKey::from_bytes(&seed)))
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.0.verifying_key().to_bytes())
    }

    /// Signs the head of a stream.
    pub fn sign(&self, stream: &str, seq: u64, hash: &str, time: &str) -> Checkpoint {
        let signature = self.0.sign(&signed_bytes(stream, seq, hash, time));
        Checkpoint {
            stream: stream.to_string(),
            seq,
            hash: hash.to_string(),
            time: time.to_string(),
            key: self.public_hex(),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

/// A public key given as 64 hex digits (or a file holding them).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let text = match std::fs::read_to_string(text) {
        Ok(content) => content,
        Err(_) => text.to_string(),
    };
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("expected an Ed25519 public key as 64 hex digits (or a file holding them)")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// Checks a checkpoint's signature against the trusted key.
pub fn check(checkpoint: &Checkpoint, trusted: &VerifyingKey) -> Result<(), String> {
    if checkpoint.key != hex::encode(trusted.to_bytes()) {
        return Err("signed by another key than the trusted one".into());
    }
    let bytes: [u8; 64] = hex::decode(&checkpoint.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the signature is not 64 bytes of hex")?;
    trusted
        .verify(
            &signed_bytes(&checkpoint.stream, checkpoint.seq, &checkpoint.hash, &checkpoint.time),
            &Signature::from_bytes(&bytes),
        )
        .map_err(|_| "bad signature".to_string())
}

/// Appends a checkpoint to a stream directory, durably.
pub fn append(dir: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(CHECKPOINT_FILE))?;
    file.write_all(&line)?;
    file.sync_data()
}

/// The checkpoints of a stream directory (none if the file is absent);
/// `Err` names the first line that is not a checkpoint.
pub fn read(dir: &Path) -> Result<Vec<Checkpoint>, String> {
    let text = match std::fs::read_to_string(dir.join(CHECKPOINT_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{CHECKPOINT_FILE}: {e}")),
    };
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| format!("{CHECKPOINT_FILE} line {}: not a checkpoint ({:?} error)", i + 1, e.classify()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer(SigningKey::from_bytes(&[7u8; 32]))
    }

    #[test]
    fn a_signed_checkpoint_verifies_only_unchanged_and_under_its_key() {
        let s = signer();
        let key = parse_public_key(&s.public_hex()).unwrap();
        let cp = s.sign("clinic/x/pod/s", 42, "ab", "2026-11-21T00:00:00Z");
        assert_eq!(check(&cp, &key), Ok(()));
        for tampered in [
            Checkpoint { seq: 41, ..cp.clone() },
            Checkpoint { hash: "cd".into(), ..cp.clone() },
            Checkpoint { stream: "clinic/y/pod/s".into(), ..cp.clone() },
            Checkpoint { time: "2026-11-22T00:00:00Z".into(), ..cp.clone() },
        ] {
            assert_eq!(check(&tampered, &key), Err("bad signature".into()));
        }
        let other = Signer(SigningKey::from_bytes(&[8u8; 32]));
        let forged = other.sign("clinic/x/pod/s", 42, "ab", "2026-11-21T00:00:00Z");
        assert!(check(&forged, &key).is_err(), "another key");
        let relabelled = Checkpoint { key: s.public_hex(), ..forged };
        assert_eq!(check(&relabelled, &key), Err("bad signature".into()));
        assert!(parse_public_key("zz").is_err());
    }

    #[test]
    fn checkpoints_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
        let cp = signer().sign("s", 1, "h", "t");
        append(dir.path(), &cp).unwrap();
        append(dir.path(), &cp).unwrap();
        assert_eq!(read(dir.path()).unwrap(), vec![cp.clone(), cp]);
        std::fs::write(dir.path().join(CHECKPOINT_FILE), "garbage\n").unwrap();
        assert!(read(dir.path()).unwrap_err().contains("line 1"));
    }
}
