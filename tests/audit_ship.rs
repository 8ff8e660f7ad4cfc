//! Shipping a WAL to the collector: everything arrives once, in order,
//! verifiably; segments are released only after the collector holds them;
//! an outage is absorbed; resends are harmless; tampering is refused and
//! becomes an incident.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mcp_warden::audit::collector::{self, store::Storage};
use mcp_warden::audit::record::{Event, Kind, Lease, LeaseAction, Record};
use mcp_warden::audit::segment;
use mcp_warden::audit::ship::{ShipError, Shipped, Shipper};
use mcp_warden::audit::verify::{VerifyOptions, verify_dir};
use mcp_warden::audit::{Wal, WalConfig};
use mcp_warden::bearer::ClientCredential;
use mcp_warden::bearer::StaticCredential;

const CREDENTIAL: &str = "collector-sender-credential-0123456789";
const READER: &str = "collector-reader-credential-0123456789";

fn lease(n: usize) -> Event {
    let mut e = Event::new(Kind::Lease);
    e.lease = Some(Lease { id: format!("lease-{n}"), action: LeaseAction::Issued, role: None, valid_until: None });
    e
}

fn wal(dir: &Path) -> Wal {
    let mut config = WalConfig::new(dir, "clinic/patient-lookup");
    config.pod = Some("pod-1".into());
    // Small segments, so shipping crosses and releases several.
    config.segment_bytes = 8 * 1024;
    Wal::open(config).unwrap()
}

/// A collector on a free loopback port, over `data`.
async fn collector(data: &Path) -> (String, Arc<Wal>) {
    let storage = Arc::new(std::sync::Mutex::new(Storage::open(data).unwrap()));
    std::fs::create_dir_all(data.join("incidents")).unwrap();
    let incidents = Arc::new(Wal::open(WalConfig::new(data.join("incidents"), collector::COLLECTOR_SERVER)).unwrap());
    let app = collector::router(
        storage,
        Arc::clone(&incidents),
        collector::Senders::Static(StaticCredential::new(CREDENTIAL).unwrap()),
        collector::Readers::Static(StaticCredential::new(READER).unwrap()),
    )
    .unwrap();
    (common::serve(app).await, incidents)
}

fn stored_records(data: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(data.join("streams")).sort_by_file_name() {
        let entry = entry.unwrap();
        if entry.file_type().is_dir() {
            for (_, path) in segment::list_segments(entry.path()).unwrap() {
                out.extend(segment::read_lines(&path).unwrap().iter().map(|l| Record::parse_line(&l.bytes).unwrap()));
            }
        }
    }
    out
}

async fn ship_all(shipper: &mut Shipper, wal: &Wal) {
    loop {
        match shipper.ship_once().await.expect("ship") {
            Shipped::Through(through) => {
                wal.release_through(through).await.unwrap();
            }
            Shipped::Idle => return,
        }
    }
}

#[tokio::test]
async fn a_wal_arrives_once_in_order_and_is_released_only_after_the_collector_holds_it() {
    let wal_dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let w = wal(wal_dir.path());
    for n in 0..300 {
        w.append(lease(n)).await.unwrap();
    }
    let segments_before = segment::list_segments(wal_dir.path()).unwrap().len();
    assert!(segments_before > 3, "the test crosses segments");

    // The collector is down: nothing is released, nothing lost.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut shipper = Shipper::new(
        wal_dir.path().into(),
        &format!("http://127.0.0.1:{closed}"),
        ClientCredential::Fixed(CREDENTIAL.into()),
    )
    .unwrap();
    assert!(matches!(shipper.ship_once().await, Err(ShipError::Unreachable(_))));
    assert_eq!(segment::list_segments(wal_dir.path()).unwrap().len(), segments_before);

    let (base, _incidents) = collector(data.path()).await;
    let mut shipper = Shipper::new(wal_dir.path().into(), &base, ClientCredential::Fixed(CREDENTIAL.into())).unwrap();
    ship_all(&mut shipper, &w).await;
    // 1 stream-start + 300 leases.
    assert_eq!(shipper.shipped(), 301);
    assert_eq!(
        segment::list_segments(wal_dir.path()).unwrap().len(),
        1,
        "shipped segments released, the active one kept"
    );
    assert!(segment::read_anchor(wal_dir.path()).unwrap().is_some());

    // More records, the stream sealed, a fresh shipper (a restarted sidecar)
    // resends from the oldest segment left: stored once.
    for n in 300..350 {
        w.append(lease(n)).await.unwrap();
    }
    w.close().await.unwrap();
    let mut restarted = Shipper::new(wal_dir.path().into(), &base, ClientCredential::Fixed(CREDENTIAL.into())).unwrap();
    loop {
        if restarted.ship_once().await.unwrap() == Shipped::Idle {
            break;
        }
    }
    let stored = stored_records(data.path());
    assert_eq!(stored.len(), 352, "stream-start, 350 leases, stream-end: each once");
    let seqs: Vec<u64> = stored.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=352).collect::<Vec<_>>());
    let report = verify_dir(&data.path().join("streams"), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
}

#[tokio::test]
async fn the_collector_refuses_strangers_garbage_and_tampering_and_records_incidents() {
    let wal_dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let w = wal(wal_dir.path());
    for n in 0..5 {
        w.append(lease(n)).await.unwrap();
    }
    w.close().await.unwrap();
    let (base, incidents) = collector(data.path()).await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/records");
    let lines: Vec<Vec<u8>> = segment::list_segments(wal_dir.path())
        .unwrap()
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).unwrap())
        .map(|l| l.bytes)
        .collect();
    let body = |ls: &[Vec<u8>]| ls.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect::<Vec<u8>>();
    let post = |bearer: &str, bytes: Vec<u8>| {
        http.post(&url).bearer_auth(bearer).header("content-type", "application/x-ndjson").body(bytes).send()
    };

    // Unauthenticated.
    assert_eq!(post("wrong-credential-wrong-credential-00", body(&lines)).await.unwrap().status(), 401);
    // Garbage, an unknown schema version, a tampered line, an oversized batch: refused, nothing stored.
    assert_eq!(post(CREDENTIAL, b"{not json\n".to_vec()).await.unwrap().status(), 400);
    let v2 = String::from_utf8(lines[0].clone()).unwrap().replacen("{\"v\":1", "{\"v\":2", 1);
    assert_eq!(post(CREDENTIAL, format!("{v2}\n").into_bytes()).await.unwrap().status(), 400);
    let tampered = String::from_utf8(lines[2].clone()).unwrap().replacen("lease-1", "lease-9", 1);
    let mut batch = lines[..2].to_vec();
    batch.push(tampered.into_bytes());
    assert_eq!(post(CREDENTIAL, body(&batch)).await.unwrap().status(), 400);
    assert_eq!(post(CREDENTIAL, vec![b'x'; 9 * 1024 * 1024]).await.unwrap().status(), 413);
    assert!(stored_records(data.path()).is_empty(), "no partial write");

    // The real batch, then a replay (idempotent), then records out of order.
    let ok = post(CREDENTIAL, body(&lines[..4])).await.unwrap();
    assert_eq!(ok.status(), 200);
    let replay: serde_json::Value = post(CREDENTIAL, body(&lines[..4])).await.unwrap().json().await.unwrap();
    assert_eq!((replay["written"].as_u64(), replay["duplicates"].as_u64()), (Some(0), Some(4)));
    let mut reordered = vec![lines[5].clone(), lines[4].clone()];
    assert_eq!(post(CREDENTIAL, body(&reordered)).await.unwrap().status(), 400);
    reordered.reverse();
    assert_eq!(post(CREDENTIAL, body(&reordered)).await.unwrap().status(), 200);
    assert_eq!(post(CREDENTIAL, body(&lines[6..])).await.unwrap().status(), 200, "the stream-end record");

    // A forged continuation (another writer's chain under this stream's
    // name) is a rewrite: refused, and an incident.
    let forged_dir = tempfile::tempdir().unwrap();
    let stream = Record::parse_line(&lines[0]).unwrap().stream;
    let forged_wal = wal(forged_dir.path());
    for n in 0..10 {
        forged_wal.append(lease(100 + n)).await.unwrap();
    }
    forged_wal.close().await.unwrap();
    let forged: Vec<Vec<u8>> = segment::list_segments(forged_dir.path())
        .unwrap()
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).unwrap())
        .map(|l| {
            let text = String::from_utf8(l.bytes).unwrap();
            let record = Record::parse_line(text.as_bytes()).unwrap();
            text.replace(&record.stream, &stream).into_bytes()
        })
        .collect();
    // (Renaming the stream breaks each record's hash: refused as invalid.)
    assert_eq!(post(CREDENTIAL, body(&forged[7..8])).await.unwrap().status(), 400);
    assert_eq!(stored_records(data.path()).len(), 7);
    let report = verify_dir(&data.path().join("streams"), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
    drop(incidents);
}

#[tokio::test]
async fn forks_and_gaps_become_incident_records() {
    use mcp_warden::audit::record::{Chain, IncidentClass};
    let data = tempfile::tempdir().unwrap();
    let (base, incidents) = collector(data.path()).await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/records");
    let mut chain = Chain::new("clinic/x/pod/s".into(), "clinic/x".into(), None);
    let mut other = Chain::new("clinic/x/pod/s".into(), "clinic/x".into(), Some("other".into()));
    let event = |n: usize| if n == 0 { Event::new(Kind::StreamStart) } else { lease(n) };
    let mine: Vec<Vec<u8>> =
        (0..6).map(|n| chain.seal(event(n), chrono::Utc::now()).unwrap().record.to_line()).collect();
    let theirs: Vec<Vec<u8>> =
        (0..6).map(|n| other.seal(event(n), chrono::Utc::now()).unwrap().record.to_line()).collect();
    let send = |line: &Vec<u8>| {
        let mut bytes = line.clone();
        bytes.push(b'\n');
        http.post(&url).bearer_auth(CREDENTIAL).header("content-type", "application/x-ndjson").body(bytes).send()
    };
    assert_eq!(send(&mine[0]).await.unwrap().status(), 200);
    assert_eq!(send(&theirs[0]).await.unwrap().status(), 409, "a fork");
    assert_eq!(send(&theirs[1]).await.unwrap().status(), 409, "a rewrite");
    assert_eq!(send(&mine[3]).await.unwrap().status(), 200, "a gap is stored, on the record");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let incidents_dir = data.path().join("incidents");
    let classes: Vec<IncidentClass> = segment::list_segments(&incidents_dir)
        .unwrap()
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).unwrap())
        .filter_map(|l| Record::parse_line(&l.bytes).unwrap().event.incident.map(|i| i.class))
        .collect();
    assert_eq!(classes, vec![IncidentClass::Fork, IncidentClass::Rewrite, IncidentClass::Gap]);
    // Health for the operator: the reader credential only; incidents counted per server.
    let health = http.get(format!("{base}/v1/health")).bearer_auth(CREDENTIAL).send().await.unwrap();
    assert_eq!(health.status(), 401, "a sender cannot read health");
    let health: serde_json::Value =
        http.get(format!("{base}/v1/health")).bearer_auth(READER).send().await.unwrap().json().await.unwrap();
    let server = &health["servers"]["clinic/x"];
    assert_eq!(server["streams"], 1);
    assert_eq!(server["openIncidents"], 3);
    assert_eq!(server["openStreams"]["clinic/x/pod/s"]["lastSeq"], 4);
    assert!(!verify_dir(&data.path().join("streams"), VerifyOptions::default()).passed(), "verify fails at the gap");
    drop(incidents);
}

#[tokio::test]
async fn signed_checkpoints_prove_the_tail_and_their_own_integrity() {
    use mcp_warden::audit::checkpoint::{CHECKPOINT_FILE, Signer, parse_public_key};
    let wal_dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("seed"), "11".repeat(32)).unwrap();
    let signer = Signer::from_file(&keys.path().join("seed")).unwrap();
    let key = parse_public_key(&signer.public_hex()).unwrap().to_bytes();
    let storage = Arc::new(std::sync::Mutex::new(Storage::open(data.path()).unwrap()));
    std::fs::create_dir_all(data.path().join("incidents")).unwrap();
    let incidents =
        Arc::new(Wal::open(WalConfig::new(data.path().join("incidents"), collector::COLLECTOR_SERVER)).unwrap());
    let app = collector::router(
        Arc::clone(&storage),
        incidents,
        collector::Senders::Static(StaticCredential::new(CREDENTIAL).unwrap()),
        collector::Readers::None,
    )
    .unwrap();
    let base = common::serve(app).await;

    let w = wal(wal_dir.path());
    for n in 0..40 {
        w.append(lease(n)).await.unwrap();
    }
    let mut shipper = Shipper::new(wal_dir.path().into(), &base, ClientCredential::Fixed(CREDENTIAL.into())).unwrap();
    ship_all(&mut shipper, &w).await;
    let mut signed = std::collections::HashMap::new();
    assert_eq!(collector::checkpoint_changed(&storage, &signer, &mut signed).unwrap(), 1);
    assert_eq!(
        collector::checkpoint_changed(&storage, &signer, &mut signed).unwrap(),
        0,
        "unchanged: no new checkpoint"
    );

    let streams = data.path().join("streams");
    let with_key = VerifyOptions { require_sealed: false, checkpoint_key: Some(key) };
    let report = verify_dir(&streams, with_key);
    assert!(report.passed(), "{}", report.to_table());
    assert_eq!(report.streams[0].checkpoints, 1);
    let unchecked = verify_dir(&streams, VerifyOptions::default());
    assert!(unchecked.to_table().contains("NOT checked"), "{}", unchecked.to_table());

    let stream_dir = std::fs::read_dir(&streams).unwrap().next().unwrap().unwrap().path();
    // The tail cut after the checkpoint: the chain that is left is intact,
    // but the checkpoint proves records are gone.
    let (_, last_segment) = segment::list_segments(&stream_dir).unwrap().pop().unwrap();
    let original = std::fs::read_to_string(&last_segment).unwrap();
    let mut lines: Vec<&str> = original.lines().collect();
    lines.truncate(lines.len() - 3);
    std::fs::write(&last_segment, lines.join("\n") + "\n").unwrap();
    assert!(verify_dir(&streams, VerifyOptions::default()).to_table().contains("signed but are gone"));
    let report = verify_dir(&streams, with_key);
    assert!(!report.passed());
    assert!(report.to_table().contains("signed but are gone (last stored seq 38)"), "{}", report.to_table());
    std::fs::write(&last_segment, &original).unwrap();

    // A checkpoint whose signature was altered, or checked under another key.
    let file = stream_dir.join(CHECKPOINT_FILE);
    let text = std::fs::read_to_string(&file).unwrap();
    let cp: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let sig = cp["signature"].as_str().unwrap();
    let flipped = format!("{}{}", if sig.starts_with('0') { "1" } else { "0" }, &sig[1..]);
    std::fs::write(&file, text.replace(sig, &flipped)).unwrap();
    assert!(verify_dir(&streams, with_key).to_table().contains("bad signature"));
    std::fs::write(&file, &text).unwrap();
    let other = VerifyOptions { require_sealed: false, checkpoint_key: Some([9u8; 32]) };
    let report = verify_dir(&streams, other);
    assert!(!report.passed());

    // The CLI takes the key as hex.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
        .args(["audit", "verify", "--checkpoint-key", &signer.public_hex()])
        .arg(&streams)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("1 signed checkpoint(s) verified"), "{stdout}");
}

/// In a cluster a sender is a sidecar's service account: it may write only
/// its own MCPServer's streams.
#[tokio::test]
async fn in_a_cluster_a_sidecar_may_write_only_its_own_servers_streams() {
    use axum::routing::post;
    use mcp_warden::audit::record::Chain;
    use mcp_warden::token_review::{COLLECTOR_AUDIENCE, TokenReviewer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    // TokenReview stand-in: `sa:<ns>:<account>` tokens for the collector's audience.
    let api = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        post(|axum::Json(review): axum::Json<serde_json::Value>| async move {
            let token = review["spec"]["token"].as_str().unwrap_or_default().to_string();
            let ok = review["spec"]["audiences"] == serde_json::json!([COLLECTOR_AUDIENCE]);
            let status = match token.strip_prefix("sa:").and_then(|r| r.split_once(':')) {
                Some((ns, account)) if ok => serde_json::json!({"authenticated": true, "audiences": [COLLECTOR_AUDIENCE],
                    "user": {"username": format!("system:serviceaccount:{ns}:{account}")}}),
                _ => serde_json::json!({"authenticated": false}),
            };
            (axum::http::StatusCode::CREATED, axum::Json(serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status})))
        }),
    );
    let api_base = common::serve(api).await;
    let client = kube::Client::try_from(kube::Config::new(api_base.parse().unwrap())).unwrap();
    let data = tempfile::tempdir().unwrap();
    let storage = Arc::new(std::sync::Mutex::new(Storage::open(data.path()).unwrap()));
    std::fs::create_dir_all(data.path().join("incidents")).unwrap();
    let incidents =
        Arc::new(Wal::open(WalConfig::new(data.path().join("incidents"), collector::COLLECTOR_SERVER)).unwrap());
    let senders = collector::Senders::TokenReview(
        Arc::new(TokenReviewer::new(client, COLLECTOR_AUDIENCE)),
        vec![
            ("system:serviceaccount:mcp-warden:mcpw-broker".into(), collector::BROKER_SENDER),
            ("system:serviceaccount:mcp-warden:mcpw-operator".into(), collector::OPERATOR_SENDER),
        ],
    );
    let base = common::serve(collector::router(storage, incidents, senders, collector::Readers::None).unwrap()).await;

    let mut chain = Chain::new("clinic/patient-lookup/pod-1/s".into(), "clinic/patient-lookup".into(), None);
    let mut line = chain.seal(Event::new(Kind::StreamStart), chrono::Utc::now()).unwrap().record.to_line();
    line.push(b'\n');
    let http = reqwest::Client::new();
    let send = |token: &str| {
        http.post(format!("{base}/v1/records"))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(line.clone())
            .send()
    };
    assert_eq!(send("sa:clinic:billing-mcpw").await.unwrap().status(), 403, "another server's sidecar");
    assert_eq!(send("sa:clinic:default").await.unwrap().status(), 401, "not a sidecar");
    assert_eq!(send("forged").await.unwrap().status(), 401);
    assert_eq!(send(CREDENTIAL).await.unwrap().status(), 401, "a static credential means nothing here");
    assert_eq!(send("sa:clinic:patient-lookup-mcpw").await.unwrap().status(), 200, "its own server's stream");
    // The broker's account ships its lease streams of any server, but a
    // stream stays bound to the sender that started it.
    assert_eq!(send("sa:mcp-warden:mcpw-broker").await.unwrap().status(), 403, "a sidecar's stream");
    // The control plane's accounts (the broker's leases, the operator's
    // verdicts) ship streams of another server, each its own.
    for (pod, token) in [("broker-0", "sa:mcp-warden:mcpw-broker"), ("operator-0", "sa:mcp-warden:mcpw-operator")] {
        let mut chain = Chain::new(format!("clinic/billing/{pod}/s"), "clinic/billing".into(), Some(pod.into()));
        let mut first = chain.seal(Event::new(Kind::StreamStart), chrono::Utc::now()).unwrap().record.to_line();
        first.push(b'\n');
        let shipped = http
            .post(format!("{base}/v1/records"))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(first)
            .send()
            .await
            .unwrap();
        assert_eq!(shipped.status(), 200, "{pod}: a control-plane stream of another server");
    }
}

#[tokio::test]
async fn a_stream_whose_pod_is_gone_without_its_stream_end_becomes_an_incident() {
    let wal_dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let wal = wal(wal_dir.path());
    for n in 0..3 {
        wal.append(lease(n)).await.unwrap();
    }
    let open_collector = |grace: Duration| {
        let storage = Arc::new(std::sync::Mutex::new(Storage::open(data.path()).unwrap()));
        std::fs::create_dir_all(data.path().join("incidents")).unwrap();
        let incidents =
            Arc::new(Wal::open(WalConfig::new(data.path().join("incidents"), collector::COLLECTOR_SERVER)).unwrap());
        let app = collector::router_with_grace(
            storage,
            Arc::clone(&incidents),
            collector::Senders::Static(StaticCredential::new(CREDENTIAL).unwrap()),
            collector::Readers::Static(StaticCredential::new(READER).unwrap()),
            grace,
        )
        .unwrap();
        (app, incidents)
    };
    let (app, incidents) = open_collector(Duration::ZERO);
    let base = common::serve(app).await;
    let mut shipper = Shipper::new(wal_dir.path().into(), &base, ClientCredential::Fixed(CREDENTIAL.into())).unwrap();
    ship_all(&mut shipper, &wal).await;
    // The pod is deleted before it could seal its stream: no stream-end.
    drop(shipper);
    drop(wal);
    let http = reqwest::Client::new();
    let report = async |present: serde_json::Value, credential: &str| {
        let response = http
            .post(format!("{base}/v1/pods"))
            .bearer_auth(credential)
            .json(&serde_json::json!({"server": "clinic/patient-lookup", "present": present}))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap_or_default())
    };
    // Only the reader (the operator) may report; garbage is refused.
    assert_eq!(report(serde_json::json!([]), CREDENTIAL).await.0, 401);
    let garbage = http.post(format!("{base}/v1/pods")).bearer_auth(READER).body("{").send().await.unwrap();
    assert_eq!(garbage.status().as_u16(), 400);
    // While its pod exists, the open stream is just open.
    let (status, body) = report(serde_json::json!(["pod-1"]), READER).await;
    assert_eq!((status, body["abandoned"].as_array().map(Vec::len)), (200, Some(0)));
    // Gone: an unsealed incident naming the last stored record, once —
    // reported the way the operator does it.
    use mcp_warden::operator::collector::{CollectorHealthSource, HttpsCollectorHealth};
    let token = data.path().join("operator.token");
    std::fs::write(&token, READER).unwrap();
    let operator = HttpsCollectorHealth::new(&base, token, None).unwrap();
    let before = operator.health().await.unwrap();
    assert_eq!(before["clinic/patient-lookup"].open_streams.len(), 1);
    let abandoned = operator.report_pods("clinic/patient-lookup", &["pod-2".to_string()]).await.unwrap();
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    let abandoned: Vec<serde_json::Value> = abandoned.into_iter().map(serde_json::Value::String).collect();
    let (_, again) = report(serde_json::json!([]), READER).await;
    assert_eq!(again["abandoned"].as_array().map(Vec::len), Some(0), "reported once");
    let health = http.get(format!("{base}/v1/health")).bearer_auth(READER).send().await.unwrap();
    let health: serde_json::Value = health.json().await.unwrap();
    let server = &health["servers"]["clinic/patient-lookup"];
    assert_eq!(server["openIncidents"], 1, "{health}");
    assert_eq!(server["openStreams"].as_object().map(|o| o.len()), Some(0), "{health}");
    drop(incidents);
    let incident_records: Vec<Record> = segment::list_segments(&data.path().join("incidents"))
        .unwrap()
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).unwrap())
        .map(|l| Record::parse_line(&l.bytes).unwrap())
        .filter(|r| r.event.kind == Kind::Incident)
        .collect();
    let incident = incident_records[0].event.incident.as_ref().unwrap();
    assert_eq!(incident.class, mcp_warden::audit::record::IncidentClass::Unsealed);
    assert_eq!(incident.stream, abandoned[0].as_str().unwrap());
    assert_eq!(incident.seq, Some(4), "stream-start and three leases were stored");
    assert!(incident.detail.contains("pod-1"), "{}", incident.detail);
    // A restarted collector remembers it (no second incident, not open).
    let mut storage = Storage::open(data.path()).unwrap();
    let again = storage
        .abandon_missing("clinic/patient-lookup", &Default::default(), chrono::Utc::now(), Duration::ZERO)
        .unwrap();
    assert!(again.is_empty());
    assert!(storage.health()["clinic/patient-lookup"].open_streams.is_empty());
}
