//! Keyed HMAC of tool arguments.
//!
//! A record must show which arguments a call used without storing them. A
//! plain hash does not do that for PHI: an 8-digit MRN has 10^8 values, and
//! hashing them all takes seconds. HMAC-SHA256 with a key held outside the
//! MCP container (a Secret mounted into the sidecar only, or a file) can be
//! recomputed only by whoever holds the key — e.g. an investigator checking
//! whether a given MRN was looked up.

use std::path::Path;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// Shortest accepted key, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// The HMAC key. Its bytes never appear in `Debug` output or errors.
#[derive(Clone)]
pub struct ArgsKey(Vec<u8>);

impl std::fmt::Debug for ArgsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArgsKey(<redacted>)")
    }
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read.
    #[error("cannot read the argument HMAC key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key is too short to resist guessing.
    #[error("the argument HMAC key has {0} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort(usize),
}

impl ArgsKey {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(ArgsKey(bytes.to_vec()))
    }

    /// The key's bytes, for deriving purpose-bound keys (never for output).
    pub fn secret(&self) -> &[u8] {
        &self.0
    }

    /// A key from a file (e.g. a mounted Secret); one trailing newline is
    /// ignored.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let bytes =
            std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        Self::from_bytes(bytes)
    }

    /// HMAC-SHA256 (hex) of the arguments in canonical JSON: object keys
    /// sorted, no whitespace. The same arguments give the same value
    /// whatever their key order.
    pub fn hmac_json(&self, args: &Value) -> String {
        let mut canonical = Vec::new();
        write_canonical(args, &mut canonical);
        // HMAC accepts keys of any length.
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(&canonical);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Canonical JSON: sorted object keys, compact; strings and numbers as
/// serde_json writes them.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&serde_json::to_vec(key).unwrap_or_default());
                out.push(b':');
                write_canonical(&map[*key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(&serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sha2::Digest;

    fn key(byte: u8) -> ArgsKey {
        ArgsKey::from_bytes(&[byte; 32]).expect("key")
    }

    #[test]
    fn key_order_does_not_matter_but_values_and_keys_do() {
        let a = json!({"mrn": "12345678", "fields": ["name", "dob"], "opts": {"b": 1, "a": 2}});
        let b = json!({"opts": {"a": 2, "b": 1}, "fields": ["name", "dob"], "mrn": "12345678"});
        assert_eq!(key(1).hmac_json(&a), key(1).hmac_json(&b));
        assert_ne!(key(1).hmac_json(&a), key(2).hmac_json(&a));
        assert_ne!(key(1).hmac_json(&a), key(1).hmac_json(&json!({"mrn": "12345679"})));
        assert_eq!(key(1).hmac_json(&a).len(), 64);
    }

    #[test]
    fn it_is_not_a_plain_hash() {
        let args = json!({"mrn": "12345678"});
        let plain = hex::encode(sha2::Sha256::digest(br#"{"mrn":"12345678"}"#));
        assert_ne!(key(1).hmac_json(&args), plain);
    }

    #[test]
    fn short_keys_and_missing_files_are_refused_without_echoing_content() {
        assert!(matches!(ArgsKey::from_bytes(b"short"), Err(KeyError::TooShort(5))));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "secret-but-short\n").expect("write");
        let err = ArgsKey::from_file(&file).expect_err("short");
        assert!(!err.to_string().contains("secret-but-short"));
        std::fs::write(&file, format!("{}\n", "k".repeat(40))).expect("write");
        assert!(ArgsKey::from_file(&file).is_ok());
        assert!(ArgsKey::from_file(&dir.path().join("missing")).is_err());
        assert_eq!(format!("{:?}", key(7)), "ArgsKey(<redacted>)");
    }
}
