//! A client of the broker API, for the sidecar's database proxy, the
//! benchmark and the tests.

use serde::Deserialize;

use crate::bearer::ClientCredential;

use super::issuer::{Credential, CredentialRequest};
use super::lifecycle::Revocation;

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached or answered garbage.
    #[error("broker unreachable: {0}")]
    Transport(String),
    /// The broker refused, with its class and message.
    #[error("broker refused ({status} {class}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error class.
        class: String,
        /// Message.
        message: String,
    },
}

#[derive(Deserialize)]
struct Refusal {
    error: String,
    message: String,
}

#[derive(Deserialize)]
struct Revoked {
    revoked: Vec<String>,
}

/// A broker at a base URL, called with a static credential.
#[derive(Clone)]
pub struct BrokerClient {
    base: String,
    credential: ClientCredential,
    http: reqwest::Client,
}

impl BrokerClient {
    /// A client of `base` (e.g. `http://127.0.0.1:8200`).
    pub fn new(base: &str, credential: &str) -> Result<BrokerClient, ClientError> {
        let http = crate::bearer::api_client(None).map_err(ClientError::Transport)?;
        Ok(BrokerClient::from_parts(base, ClientCredential::Fixed(credential.to_string()), http))
    }

    /// A client of `base` presenting `credential` (re-read per request when
    /// it is a file) over `http`.
    pub fn from_parts(base: &str, credential: ClientCredential, http: reqwest::Client) -> BrokerClient {
        BrokerClient { base: base.trim_end_matches('/').to_string(), credential, http }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Asks for a credential.
    pub async fn credential(&self, request: &CredentialRequest) -> Result<Credential, ClientError> {
        self.post("/v1/credentials", request).await
    }

    /// The break-glass grants in force for one caller of `server`.
    pub async fn emergency_grants(
        &self,
        server: &str,
        subject: &str,
    ) -> Result<Vec<crate::breakglass::ActiveGrant>, ClientError> {
        let request = super::api::GrantsRequest { server: server.to_string(), subject: subject.to_string() };
        let answer: super::api::GrantsAnswer = self.post("/v1/emergency-grants", &request).await?;
        Ok(answer.grants)
    }

    /// Revokes leases; returns the roles ended.
    pub async fn revoke(&self, revocation: &Revocation) -> Result<Vec<String>, ClientError> {
        let revoked: Revoked = self.post("/v1/revocations", revocation).await?;
        Ok(revoked.revoked)
    }

    /// Asks who a pseudonym is (recorded by the broker).
    pub async fn reidentify(
        &self,
        request: &super::reidentify::ReidentifyRequest,
    ) -> Result<super::reidentify::Reidentified, ClientError> {
        self.post("/v1/reidentifications", request).await
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let credential = self.credential.current().map_err(ClientError::Transport)?;
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(credential)
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Transport(format!("bad answer: {e}")));
        }
        let refusal: Refusal = serde_json::from_slice(&bytes).unwrap_or(Refusal {
            error: "unknown".into(),
            message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        });
        Err(ClientError::Refused { status: status.as_u16(), class: refusal.error, message: refusal.message })
    }
}
