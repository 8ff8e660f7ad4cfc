//! The demo's clinic: a synthetic PHI database (no real person in it) and
//! the manifests that describe it — the PHIStore with its column
//! classification, the MCPServer with its tools, the broker's admin Secret
//! and the issuer's JWKS. Pure text; `stack` writes and loads it.

use serde_json::Value;

/// Namespace of the manifests.
pub const NAMESPACE: &str = "clinic";
/// The MCPServer's name.
pub const SERVER: &str = "patient-lookup";
/// The PHIStore's name.
pub const STORE: &str = "ehr";
/// The database.
pub const DATABASE: &str = "ehr";
/// The broker's admin role.
pub const ADMIN_ROLE: &str = "warden_admin";
/// The server's resource URI (`aud` of its tokens).
pub const AUDIENCE: &str = "https://patient-lookup.clinic.example/mcp";
/// Schema of the server's de-identified views (`deid_` + the scope).
pub const VIEWS: &str = "deid_patient_lookup";

/// A synthetic patient: every value is made up.
pub struct Patient {
    /// Key.
    pub id: i32,
    /// Medical record number.
    pub mrn: &'static str,
    /// Given name.
    pub given: &'static str,
    /// Family name.
    pub family: &'static str,
    /// Birth date.
    pub birth_date: &'static str,
    /// ZIP code.
    pub zip: &'static str,
    /// Social security number (never classified: no view shows it).
    pub ssn: &'static str,
}

/// The clinic's patients.
pub const PATIENTS: [Patient; 4] = [
    Patient {
        id: 101,
        mrn: "MRN-004711",
        given: "Maria",
        family: "Testperson",
        birth_date: "1958-03-14",
        zip: "02139",
        ssn: "900-12-3456",
    },
    Patient {
        id: 102,
        mrn: "MRN-004712",
        given: "Jonas",
        family: "Beispiel",
        birth_date: "1971-11-02",
        zip: "02141",
        ssn: "900-23-4567",
    },
    Patient {
        id: 103,
        mrn: "MRN-004713",
        given: "Aiko",
        family: "Sample",
        birth_date: "1989-06-30",
        zip: "02139",
        ssn: "900-34-5678",
    },
    Patient {
        id: 104,
        mrn: "MRN-004714",
        given: "Pedro",
        family: "Ejemplo",
        birth_date: "2001-01-19",
        zip: "02142",
        ssn: "900-45-6789",
    },
];

/// Every identifying value of the clinic that text can be searched for:
/// none may reach the MCP server or its caller through a de-identified
/// tool. (Keys are numbers a pseudonym's hex may contain by chance; answers
/// are checked to hold pseudonyms in their place.)
pub fn identifiers() -> Vec<&'static str> {
    PATIENTS.iter().flat_map(|p| [p.mrn, p.given, p.family, p.birth_date, p.ssn]).collect()
}

/// Roles, run as the superuser in `postgres`.
pub fn roles_sql(admin_password: &str) -> String {
    let password = admin_password.replace('\'', "''");
    format!(
        "CREATE ROLE ehr_owner NOLOGIN;
         CREATE ROLE {ADMIN_ROLE} LOGIN CREATEROLE PASSWORD '{password}';
         GRANT pg_signal_backend TO {ADMIN_ROLE};"
    )
}

/// A CA made for this run and the database's certificate for 127.0.0.1
/// signed by it: the CA's PEM and the server's TLS material.
pub fn tls_material() -> anyhow::Result<(String, crate::local_postgres::ServerTls)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "mcp-warden demo CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, "ehr-db");
    let cert = params.signed_by(&key, &ca)?;
    Ok((ca.pem(), crate::local_postgres::ServerTls { cert_pem: cert.pem(), key_pem: key.serialize_pem() }))
}

/// The clinic's database (a statement of its own: not in a transaction).
pub fn database_sql() -> String {
    format!("CREATE DATABASE {DATABASE} OWNER ehr_owner")
}

/// Tables, rows and the admin's grants (what docs/broker.md asks for and no
/// more), run as the superuser in the clinic's database.
pub fn schema_sql() -> String {
    let patients: Vec<String> = PATIENTS
        .iter()
        .map(|p| {
            format!(
                "({}, '{}', '{}', '{}', '{}', '{}', '{}')",
                p.id, p.mrn, p.given, p.family, p.birth_date, p.zip, p.ssn
            )
        })
        .collect();
    format!(
        "CREATE SCHEMA clinical AUTHORIZATION ehr_owner;
         SET ROLE ehr_owner;
         CREATE TABLE clinical.patients (id int PRIMARY KEY, mrn text, given_name text, family_name text,
                                         birth_date date, zip text, ssn text);
         CREATE TABLE clinical.appointments (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                             patient_id int REFERENCES clinical.patients, starts_at timestamptz,
                                             clinician text, reason text);
         CREATE TABLE clinical.notes (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, patient_id int, body text);
         INSERT INTO clinical.patients VALUES {rows};
         INSERT INTO clinical.appointments (patient_id, starts_at, clinician, reason) VALUES
           (101, '2026-11-26 09:00+00', 'dr-okafor', 'follow-up after fall, lives alone at 12 Elm St'),
           (103, '2026-11-26 10:30+00', 'dr-okafor', 'asthma review'),
           (102, '2026-11-26 11:00+00', 'dr-lindqvist', 'knee pain'),
           (104, '2026-11-27 08:30+00', 'dr-okafor', 'vaccination');
         INSERT INTO clinical.notes (patient_id, body) VALUES (101, 'Patient reports dizziness.');
         RESET ROLE;
         GRANT CONNECT, CREATE ON DATABASE {DATABASE} TO {ADMIN_ROLE} WITH GRANT OPTION;
         GRANT USAGE ON SCHEMA clinical TO {ADMIN_ROLE} WITH GRANT OPTION;
         GRANT SELECT ON clinical.patients, clinical.appointments TO {ADMIN_ROLE} WITH GRANT OPTION;
         GRANT TRIGGER ON clinical.patients, clinical.appointments TO {ADMIN_ROLE};",
        rows = patients.join(", ")
    )
}

/// What the broker reads besides [`manifests`]: the admin Secret, the
/// issuer's JWKS and the database's CA.
pub fn broker_secrets(admin_password: &str, jwks: &Value, ca_pem: &str) -> String {
    let password = serde_json::to_string(admin_password).unwrap_or_default();
    let jwks = serde_json::to_string(&jwks.to_string()).unwrap_or_default();
    let ca = serde_json::to_string(ca_pem).unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: ehr-db-admin, namespace: {NAMESPACE}}}
stringData: {{username: {ADMIN_ROLE}, password: {password}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: idp-jwks, namespace: {NAMESPACE}}}
data: {{jwks.json: {jwks}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: ehr-db-ca, namespace: {NAMESPACE}}}
data: {{ca.crt: {ca}}}
"#
    )
}

/// The PHIStore and the MCPServer (what `check` and the sidecar read).
pub fn manifests(pg_port: u16) -> String {
    format!(
        r#"apiVersion: mcpwarden.io/v1alpha1
kind: PHIStore
metadata: {{name: {STORE}, namespace: {NAMESPACE}}}
spec:
  # TLS under the demo's CA, certificate and host name verified.
  postgres: {{host: 127.0.0.1, port: {pg_port}, database: {DATABASE}, adminSecretRef: {{name: ehr-db-admin}}, sslMode: verify-full, caConfigMapRef: {{name: ehr-db-ca}}}}
  endpoints: {{ipBlocks: [{{cidr: 127.0.0.1/32}}], ports: [{pg_port}]}}
  deidentification:
    entities:
      - {{name: patient, prefix: pt, key: {{table: clinical.patients, column: id}}}}
    tables:
      - name: clinical.patients
        columns:
          - {{name: id, class: Identifier, entity: patient}}
          - {{name: mrn, class: Identifier, entity: patient, keyColumn: id}}
          - {{name: given_name, class: Identifier, entity: patient, keyColumn: id}}
          - {{name: family_name, class: Identifier, entity: patient, keyColumn: id}}
          - {{name: birth_date, class: Quasi, generalize: BirthYear}}
          - {{name: zip, class: Quasi, generalize: Zip3}}
      - name: clinical.appointments
        columns:
          - {{name: patient_id, class: Identifier, entity: patient}}
          - {{name: starts_at, class: Quasi, generalize: Year}}
          - {{name: clinician, class: Clear}}
          - {{name: reason, class: FreeText}}
    identifierPatterns:
      - {{name: mrn, regex: 'MRN-[0-9]{{6,}}'}}
---
apiVersion: mcpwarden.io/v1alpha1
kind: MCPServer
metadata: {{name: {SERVER}, namespace: {NAMESPACE}}}
spec:
  image: registry.example/phi-tools:1.4
  authentication:
    oidc: {{issuer: "{issuer}", audience: "{AUDIENCE}", jwksConfigMapRef: {{name: idp-jwks}}, groupsClaim: groups, requiredScopes: [mcp:tools]}}
  tools:
    - name: clinician_patients
      phi: true
      purpose: A clinician's patients, as pseudonyms, for the front desk's scheduling
      allowedCallers: {{groups: [front-desk]}}
      dataAccess:
        - store: {STORE}
          tables:
            - {{name: clinical.appointments, columns: [patient_id, starts_at, clinician], privileges: [SELECT]}}
    - name: lookup_patient
      phi: true
      purpose: A patient's birth year and ZIP prefix, by pseudonym, for scheduling
      allowedCallers: {{groups: [front-desk]}}
      dataAccess:
        - store: {STORE}
          tables:
            - {{name: clinical.patients, columns: [id, birth_date, zip], privileges: [SELECT]}}
    - name: clinic_hours
      phi: false
      allowedCallers: {{anyAuthenticated: true}}
      dataAccess: []
      noDataAccessReason: returns static opening hours
  credentials: {{ttl: 15m}}
  audit: {{failurePolicy: Closed}}
"#,
        issuer = super::issuer::ISSUER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_are_admitted_and_compile_to_the_demo_policy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("clinic.yaml");
        let secrets = broker_secrets("pw'\"x", &serde_json::json!({"keys": []}), "-----BEGIN CERTIFICATE-----\nx\n");
        let all = format!("{secrets}---\n{}", manifests(5432));
        std::fs::write(&file, all).unwrap();
        let (set, errors) = crate::manifest::load_paths(&[file]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.servers.len(), 1);
        let stores = set.stores.iter().map(|s| (kube::ResourceExt::name_any(&s.object), s.object.clone())).collect();
        let policy = crate::policy::compile(&set.servers[0].object, &stores).unwrap();
        let tools: Vec<&str> = policy.tools.keys().map(String::as_str).collect();
        assert_eq!(tools, ["clinic_hours", "clinician_patients", "lookup_patient"]);
        assert_eq!(policy.authentication.audience, AUDIENCE);
    }

    #[test]
    fn identifiers_cover_every_identifying_value() {
        let all = identifiers();
        for p in &PATIENTS {
            for value in [p.mrn, p.given, p.family, p.ssn, p.birth_date] {
                assert!(all.contains(&value));
            }
        }
        assert!(schema_sql().contains("MRN-004714"));
    }
}
