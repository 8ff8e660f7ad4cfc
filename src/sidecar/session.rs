//! Sessions bound to their caller, statelessly (protocol 2025-03-26 …
//! 2025-11-25, where the server mints `Mcp-Session-Id` on `initialize`).
//!
//! The client never sees the server's session id alone: the sidecar hands
//! out `<server id>.<tag>`, where the tag is an HMAC over the caller's
//! subject and the id. Any sidecar replica holding the key can check it,
//! before and after a restart; another caller presenting it fails the
//! check.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Key of the session tags (derived from the argument-HMAC key with a
/// distinct label, so one secret serves both purposes without mixing them).
#[derive(Clone)]
pub struct SessionKey(Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// Why a presented session id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Not of the form `<id>.<tag>`.
    #[error("malformed session id")]
    Malformed,
    /// The tag does not match this caller.
    #[error("session belongs to another caller")]
    OtherCaller,
}

impl SessionKey {
    /// Derives the session key from a secret.
    pub fn derive(secret: &[u8]) -> Self {
        SessionKey(tag_bytes(secret, b"mcp-warden session binding v1"))
    }

    fn tag(&self, subject: &str, session: &str) -> String {
        let mut message = Vec::with_capacity(subject.len() + session.len() + 1);
        message.extend_from_slice(subject.as_bytes());
        message.push(0);
        message.extend_from_slice(session.as_bytes());
        hex::encode(&tag_bytes(&self.0, &message)[..16])
    }

    /// The id handed to the client for the server's `session`.
    pub fn bind(&self, subject: &str, session: &str) -> String {
        format!("{session}.{}", self.tag(subject, session))
    }

    /// The server's session id, if `presented` was bound to `subject`.
    pub fn unbind(&self, subject: &str, presented: &str) -> Result<String, SessionError> {
        let (session, tag) = presented.rsplit_once('.').ok_or(SessionError::Malformed)?;
        if session.is_empty() || tag.len() != 32 {
            return Err(SessionError::Malformed);
        }
        let expected = self.tag(subject, session);
        // Constant-time comparison of the tags.
        let same = expected.len() == tag.len()
            && expected.bytes().zip(tag.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same { Ok(session.to_string()) } else { Err(SessionError::OtherCaller) }
    }
}

fn tag_bytes(key: &[u8], message: &[u8]) -> Vec<u8> {
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length; this arm is unreachable in practice.
        Err(_) => vec![0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_works_only_for_its_caller_and_survives_a_new_key_instance() {
        let key = SessionKey::derive(&[7; 32]);
        let bound = key.bind("alice", "abc-123");
        assert!(bound.starts_with("abc-123."));
        assert_eq!(key.unbind("alice", &bound), Ok("abc-123".into()));
        assert_eq!(key.unbind("bob", &bound), Err(SessionError::OtherCaller));
        // Another replica (or a restart) with the same secret agrees.
        assert_eq!(SessionKey::derive(&[7; 32]).unbind("alice", &bound), Ok("abc-123".into()));
        assert_eq!(SessionKey::derive(&[8; 32]).unbind("alice", &bound), Err(SessionError::OtherCaller));
        assert_eq!(key.unbind("alice", "abc-123"), Err(SessionError::Malformed));
        assert_eq!(key.unbind("alice", ".0123456789abcdef0123456789abcdef"), Err(SessionError::Malformed));
        let forged = format!("abc-124.{}", &bound[8..]);
        assert_eq!(key.unbind("alice", &forged), Err(SessionError::OtherCaller));
    }
}
