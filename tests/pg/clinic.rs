//! The clinic the broker tests and benchmark run against: a PHI database
//! whose tables belong to `ehr_owner`, a broker admin role holding only
//! what docs/broker.md asks for, and the manifests that describe them.

use super::Postgres;
use crate::common::{AUDIENCE, ISSUER, JWKS};

/// Password of the broker's admin role `warden_admin`.
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
/// The MCPServer of the manifests.
pub const SERVER: &str = "clinic/patient-lookup";

/// The PHI database: tables owned by `ehr_owner`; the broker's admin holds
/// CREATEROLE, pg_signal_backend and grant options only.
pub const SCHEMA_SQL: &str = "
CREATE SCHEMA clinical AUTHORIZATION ehr_owner;
SET ROLE ehr_owner;
CREATE TABLE clinical.patients (id int PRIMARY KEY, mrn text, name text, dob date, ssn text, diagnosis text);
CREATE TABLE clinical.notes (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, patient_id int, body text, author text);
CREATE TABLE clinical.billing (patient_id int, amount numeric);
INSERT INTO clinical.patients VALUES (1, 'MRN-0001', 'Joe Doe', '1970-01-01', '123-45-6789', 'influenza');
RESET ROLE;
GRANT USAGE ON SCHEMA clinical TO warden_admin WITH GRANT OPTION;
GRANT SELECT, INSERT, UPDATE ON clinical.patients, clinical.notes TO warden_admin WITH GRANT OPTION;
";

/// The classification of the clinic's columns (on the PHIStore).
pub const CLASSIFICATION: &str = "
  deidentification:
    entities: [{name: patient, prefix: pt, key: {table: clinical.patients, column: id}}]
    tables:
      - name: clinical.patients
        columns:
          - {name: id, class: Identifier, entity: patient}
          - {name: mrn, class: Identifier, entity: patient, keyColumn: id}
          - {name: name, class: Identifier, entity: patient, keyColumn: id}
          - {name: ssn, class: Identifier, entity: patient, keyColumn: id}
          - {name: dob, class: Quasi, generalize: BirthYear}
          - {name: diagnosis, class: Clear}
    identifierPatterns: [{name: mrn, regex: 'MRN-[0-9]{4,}'}]";

/// The scope schema of the clinic server's de-identified views.
pub const VIEWS: &str = "deid_patient_lookup";

/// The admin Secret and the JWKS ConfigMap of namespace `clinic`, each
/// followed by a document separator.
pub fn secret_and_keys(admin_password: &str) -> String {
    let jwks = serde_json::to_string(&serde_json::from_str::<serde_json::Value>(JWKS).unwrap()).unwrap();
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: ehr-db-admin, namespace: clinic}}
stringData: {{username: warden_admin, password: "{admin_password}"}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: idp-jwks, namespace: clinic}}
data:
  jwks.json: '{jwks}'
---
"#
    )
}

/// The Secret, the JWKS ConfigMap and the PHIStore (with its classification).
fn store_manifests(port: u16, admin_password: &str) -> String {
    format!(
        r#"{keys}apiVersion: mcpwarden.io/v1alpha1
kind: PHIStore
metadata: {{name: ehr, namespace: clinic}}
spec:
  postgres: {{host: 127.0.0.1, port: {port}, database: ehr, adminSecretRef: {{name: ehr-db-admin}}, sslMode: disable}}
  endpoints: {{ipBlocks: [{{cidr: 127.0.0.1/32}}], ports: [{port}]}}{CLASSIFICATION}
"#,
        keys = secret_and_keys(admin_password)
    )
}

/// The store and an MCPServer whose `tools` YAML (indented list items) is
/// given, plus the non-PHI `clinic_hours`.
pub fn server_manifests(port: u16, admin_password: &str, tools: &str) -> String {
    format!(
        r#"{store}---
apiVersion: mcpwarden.io/v1alpha1
kind: MCPServer
metadata: {{name: patient-lookup, namespace: clinic}}
spec:
  image: registry.example/phi-tools:1.4
  authentication:
    oidc: {{issuer: "{ISSUER}", audience: "{AUDIENCE}", jwksConfigMapRef: {{name: idp-jwks}}}}
  tools:{tools}
    - name: clinic_hours
      phi: false
      allowedCallers: {{anyAuthenticated: true}}
      dataAccess: []
      noDataAccessReason: static opening hours
  credentials: {{ttl: 15m}}
"#,
        store = store_manifests(port, admin_password)
    )
}

/// The broker's clinic: `lookup_patient` reads `lookup_columns` of
/// clinical.patients itself (`Identified`); `record_note` (optional)
/// inserts into clinical.notes.
pub fn manifests(port: u16, lookup_columns: &[&str], with_note_tool: bool, admin_password: &str) -> String {
    let columns = lookup_columns.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    let note_tool = if with_note_tool {
        r#"
    - name: record_note
      phi: true
      purpose: Record a visit note
      allowedCallers: {groups: [clinicians]}
      output: Identified
      identifiedReason: writes to the clinical record
      dataAccess:
        - store: ehr
          tables:
            - name: clinical.notes
              columns: [patient_id, body]
              privileges: [INSERT]"#
    } else {
        ""
    };
    let tools = format!(
        r#"
    - name: lookup_patient
      phi: true
      purpose: Verify a patient's identity at check-in
      allowedCallers: {{groups: [front-desk, clinicians]}}
      output: Identified
      identifiedReason: check-in compares the real identity
      dataAccess:
        - store: ehr
          tables:
            - name: clinical.patients
              columns: [{columns}]
              privileges: [SELECT]{note_tool}"#
    );
    server_manifests(port, admin_password, &tools)
}

/// The reference server's clinic (examples/phi-server): `find_patients`
/// and `lookup_patient` are de-identified, reading the views of
/// [`VIEWS`]; `allow_copy` lets `lookup_patient` run COPY.
pub fn deidentified_manifests(port: u16, allow_copy: bool) -> String {
    let copy = if allow_copy { "\n          allowCopy: true" } else { "" };
    let tools = format!(
        r#"
    - name: find_patients
      phi: true
      purpose: Find patients by diagnosis, as pseudonyms, for care coordination
      allowedCallers: {{groups: [front-desk, clinicians]}}
      dataAccess:
        - store: ehr
          tables: [{{name: clinical.patients, columns: [id, dob, diagnosis], privileges: [SELECT]}}]
    - name: lookup_patient
      phi: true
      purpose: A patient's birth year and diagnosis, by pseudonym
      allowedCallers: {{groups: [front-desk, clinicians]}}
      dataAccess:
        - store: ehr{copy}
          tables: [{{name: clinical.patients, columns: [id, dob, diagnosis], privileges: [SELECT]}}]"#
    );
    server_manifests(port, ADMIN_PASSWORD, &tools)
}

/// Creates the database, its owner, the admin role and the tables.
pub async fn prepare_database(pg: &Postgres) {
    let root = pg.superuser("postgres").await;
    root.batch_execute(&format!(
        "CREATE ROLE ehr_owner NOLOGIN;
         CREATE ROLE warden_admin LOGIN CREATEROLE PASSWORD '{ADMIN_PASSWORD}';
         GRANT pg_signal_backend TO warden_admin;"
    ))
    .await
    .unwrap();
    root.batch_execute("CREATE DATABASE ehr OWNER ehr_owner").await.unwrap();
    let ehr = pg.superuser("ehr").await;
    ehr.batch_execute("GRANT CONNECT ON DATABASE ehr TO warden_admin WITH GRANT OPTION").await.unwrap();
    ehr.batch_execute(SCHEMA_SQL).await.unwrap();
    // What de-identified views need (docs/broker.md): schemas, and the
    // token trigger on the patients' key table.
    ehr.batch_execute(
        "GRANT CREATE ON DATABASE ehr TO warden_admin; GRANT TRIGGER ON clinical.patients TO warden_admin",
    )
    .await
    .unwrap();
}

/// A test CA and a server certificate for `sans` signed by it: the CA's PEM
/// and the server's TLS material.
pub fn tls_material(sans: &[&str]) -> (String, super::ServerTls) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "mcp-warden test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "ehr-db");
    let cert = params.signed_by(&server_key, &ca).unwrap();
    (ca.pem(), super::ServerTls { cert_pem: cert.pem(), key_pem: server_key.serialize_pem() })
}

/// `manifests` with the store at `host` in `ssl_mode`, trusting `ca`
/// through a `caConfigMapRef`.
pub fn with_tls(manifests: &str, host: &str, ca: &str, ssl_mode: &str) -> String {
    let indented = ca.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    manifests
        .replace("host: 127.0.0.1,", &format!("host: {host},"))
        .replace("sslMode: disable}", &format!("sslMode: {ssl_mode}, caConfigMapRef: {{name: ehr-db-ca}}}}"))
        + &format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ehr-db-ca, namespace: clinic}}\ndata:\n  ca.crt: |\n{indented}\n"
        )
}
