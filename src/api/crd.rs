//! The CustomResourceDefinitions, as `mcp-warden crd` prints them and
//! `crds/` commits them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{EmergencyAccess, MCPServer, PHIStore};

/// Every CRD of mcp-warden, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![MCPServer::crd(), PHIStore::crd(), EmergencyAccess::crd()]
}

/// All CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
