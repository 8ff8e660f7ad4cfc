//! Property tests: any stream round-trips and verifies; any single flipped
//! byte, deleted, reordered, duplicated or truncated record is found, at the
//! position where it was damaged.

use std::path::Path;

use chrono::Utc;
use proptest::prelude::*;

use super::*;
use crate::audit::record::{
    Caller, Chain, Decision, Event, Incident, IncidentClass, Lease, LeaseAction, Outcome, OutcomeStatus, Sealed,
};

fn text() -> impl Strategy<Value = String> {
    // Quotes, backslashes, control characters and non-ASCII all have to
    // survive canonical encoding.
    proptest::string::string_regex("[a-zA-Z0-9 _.:/\"\\\\\n\t\u{7f}\u{e9}\u{4e2d}\u{1F600}-]{0,24}").expect("regex")
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (text(), text(), any::<bool>(), text(), proptest::collection::vec(text(), 0..3)).prop_map(
            |(sub, tool, allow, reason, groups)| Event {
                correlation: Some(format!("c-{sub}")),
                caller: Some(Caller { sub, iss: "https://login.example.org".into(), groups }),
                method: Some("tools/call".into()),
                tool: Some(tool),
                phi: Some(allow),
                decision: Some(if allow { Decision::Allow } else { Decision::Deny }),
                reason: Some(reason),
                ..Event::new(Kind::Decision)
            }
        ),
        (text(), any::<u64>(), any::<u16>(), any::<u64>()).prop_map(|(corr, rows, status, duration)| Event {
            correlation: Some(corr),
            outcome: Some(Outcome {
                status: OutcomeStatus::Ok,
                http_status: Some(status),
                rpc_error: None,
                rows: Some(rows),
            }),
            duration_us: Some(duration),
            ..Event::new(Kind::Outcome)
        }),
        (text(), text()).prop_map(|(corr, statement)| Event {
            correlation: Some(corr),
            store: Some("ehr".into()),
            statement: Some(statement),
            outcome: Some(Outcome {
                status: OutcomeStatus::Refused,
                http_status: None,
                rpc_error: Some(-1),
                rows: None
            }),
            ..Event::new(Kind::Statement)
        }),
        text().prop_map(|id| Event {
            lease: Some(Lease { id, action: LeaseAction::Issued, role: Some("r".into()), valid_until: None }),
            ..Event::new(Kind::Lease)
        }),
        text().prop_map(|detail| Event {
            incident: Some(Incident { class: IncidentClass::Gap, stream: "s".into(), seq: Some(3), detail }),
            ..Event::new(Kind::Incident)
        }),
    ]
}

/// A sealed stream: stream-start, the events, stream-end.
fn build(events: Vec<Event>) -> Vec<Sealed> {
    let mut chain =
        Chain::new("clinic/patient-lookup/p-1/test".into(), "clinic/patient-lookup".into(), Some("p-1".into()));
    let mut out = vec![chain.seal(Event::new(Kind::StreamStart), Utc::now()).expect("start")];
    for event in events {
        out.push(chain.seal(event, Utc::now()).expect("event"));
    }
    out.push(chain.seal(Event::new(Kind::StreamEnd), Utc::now()).expect("end"));
    out
}

/// Segments as (declared first seq, lines with newlines).
type Layout = Vec<(u64, Vec<Vec<u8>>)>;

fn layout(sealed: &[Sealed], cuts: &[usize]) -> Layout {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % sealed.len()).filter(|c| *c > 0).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for end in bounds.into_iter().chain([sealed.len()]) {
        out.push((sealed[start].record.seq, sealed[start..end].iter().map(|s| s.line.clone()).collect()));
        start = end;
    }
    out
}

fn write(dir: &Path, layout: &Layout) {
    for (first, lines) in layout {
        std::fs::write(dir.join(segment::segment_name(*first)), lines.concat()).expect("write segment");
    }
}

fn verify_layout(layout: &Layout) -> StreamReport {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), layout);
    let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.streams.len(), 1);
    report.streams[0].clone()
}

/// (segment index, line index) of every record, in order.
fn positions(layout: &Layout) -> Vec<(usize, usize)> {
    layout.iter().enumerate().flat_map(|(s, (_, lines))| (0..lines.len()).map(move |l| (s, l))).collect()
}

fn stream_case() -> impl Strategy<Value = (Vec<Sealed>, Vec<usize>)> {
    (proptest::collection::vec(event(), 1..12), proptest::collection::vec(any::<usize>(), 0..4))
        .prop_map(|(events, cuts)| (build(events), cuts))
}

#[track_caller]
fn assert_break_at(report: &StreamReport, expected_seq: u64) {
    let broken = report.broken.as_ref().unwrap_or_else(|| panic!("tampering went undetected: {report:#?}"));
    assert_eq!(broken.expected_seq, expected_seq, "{broken}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_stream_round_trips_and_verifies((sealed, cuts) in stream_case()) {
        for s in &sealed {
            let line = &s.line[..s.line.len() - 1];
            prop_assert_eq!(&Record::parse_line(line).expect("parses"), &s.record);
            prop_assert_eq!(s.record.to_line(), line.to_vec());
        }
        let report = verify_layout(&layout(&sealed, &cuts));
        prop_assert!(report.passed(), "{:#?}", report);
        prop_assert_eq!(report.records, sealed.len() as u64);
        prop_assert!(report.sealed);
        prop_assert_eq!(report.last_seq, Some(sealed.len() as u64));
    }

    #[test]
    fn a_flipped_byte_is_found_in_its_record((sealed, cuts) in stream_case(), pick in any::<usize>(), bit in 0u8..8) {
        let mut segments = layout(&sealed, &cuts);
        let all = positions(&segments);
        let (s, l) = all[pick % all.len()];
        let line = &mut segments[s].1[l];
        let at = (pick / all.len()) % line.len();
        line[at] ^= 1 << bit;
        let report = verify_layout(&segments);
        let seq = sealed.iter().position(|x| x.line == layout(&sealed, &cuts)[s].1[l]).map(|i| i as u64 + 1).expect("seq");
        assert_break_at(&report, seq);
        let broken = report.broken.expect("break");
        prop_assert!(broken.segment.ends_with(segment::segment_name(segments[s].0)), "{}", broken);
        prop_assert_eq!(broken.line, l + 1);
    }

    #[test]
    fn a_deleted_record_is_found((sealed, cuts) in stream_case(), pick in any::<usize>()) {
        let mut segments = layout(&sealed, &cuts);
        let all = positions(&segments);
        let index = pick % all.len();
        let (s, l) = all[index];
        segments[s].1.remove(l);
        assert_break_at(&verify_layout(&segments), index as u64 + 1);
    }

    #[test]
    fn reordered_records_are_found((sealed, cuts) in stream_case(), a in any::<usize>(), b in any::<usize>()) {
        let mut segments = layout(&sealed, &cuts);
        let all = positions(&segments);
        let (i, j) = (a % all.len(), b % all.len());
        prop_assume!(i != j);
        let (first, second) = (i.min(j), i.max(j));
        let (s1, l1) = all[first];
        let (s2, l2) = all[second];
        let x = segments[s1].1[l1].clone();
        segments[s1].1[l1] = std::mem::replace(&mut segments[s2].1[l2], x);
        assert_break_at(&verify_layout(&segments), first as u64 + 1);
    }

    #[test]
    fn a_duplicated_record_is_found((sealed, cuts) in stream_case(), pick in any::<usize>()) {
        let mut segments = layout(&sealed, &cuts);
        let all = positions(&segments);
        let index = pick % all.len();
        let (s, l) = all[index];
        let copy = segments[s].1[l].clone();
        segments[s].1.insert(l + 1, copy);
        assert_break_at(&verify_layout(&segments), index as u64 + 2);
    }

    #[test]
    fn a_truncated_stream_is_found((sealed, cuts) in stream_case(), pick in any::<usize>()) {
        let segments = layout(&sealed, &cuts);
        let total: usize = sealed.iter().map(|s| s.line.len()).sum();
        let cut = pick % total;
        // Keep `cut` bytes of the stream, in order; later segment files are gone.
        let mut kept: Layout = Vec::new();
        let mut left = cut;
        for (first, lines) in &segments {
            if left == 0 {
                break;
            }
            let bytes = lines.concat();
            let take = left.min(bytes.len());
            left -= take;
            kept.push((*first, vec![bytes[..take].to_vec()]));
        }
        // The first record not wholly kept is where the break must be.
        let mut offset = 0;
        let damaged = sealed.iter().position(|s| {
            offset += s.line.len();
            offset > cut
        }).map(|i| i as u64 + 1).expect("some record is cut");
        if kept.is_empty() {
            let dir = tempfile::tempdir().expect("tempdir");
            let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
            prop_assert!(!report.passed());
        } else {
            assert_break_at(&verify_layout(&kept), damaged);
        }
    }
}

#[test]
fn an_anchor_lets_a_released_stream_verify_and_a_wrong_one_does_not() {
    let mut more = build(
        (0..6)
            .map(|n| Event {
                lease: Some(Lease {
                    id: format!("l-{n}"),
                    action: LeaseAction::Expired,
                    role: None,
                    valid_until: None,
                }),
                ..Event::new(Kind::Lease)
            })
            .collect(),
    );
    // Release records 1..=3: keep 4.. and anchor at 3.
    let dir = tempfile::tempdir().expect("tempdir");
    let kept = more.split_off(3);
    std::fs::write(
        dir.path().join(segment::segment_name(4)),
        kept.iter().map(|s| s.line.clone()).collect::<Vec<_>>().concat(),
    )
    .expect("write");
    let anchor = Anchor { stream: more[2].record.stream.clone(), seq: 3, hash: more[2].record.hash.clone() };
    segment::write_anchor(dir.path(), &anchor).expect("anchor");
    let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.streams[0].anchored_after, Some(3));
    let forged = Anchor { hash: more[1].record.hash.clone(), ..anchor };
    segment::write_anchor(dir.path(), &forged).expect("anchor");
    assert_break_at(
        &verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() }).streams[0],
        4,
    );
}

#[test]
fn an_open_stream_passes_unless_a_seal_is_required() {
    let mut sealed = build(vec![]);
    sealed.pop();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(segment::segment_name(1)), sealed[0].line.clone()).expect("write");
    let open = verify_dir(dir.path(), VerifyOptions::default());
    assert!(open.passed() && !open.streams[0].sealed, "{open:#?}");
    let strict = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(!strict.passed());
    assert!(strict.streams[0].broken.as_ref().is_some_and(|b| b.reason.contains("without a stream-end")));
}

#[test]
fn directories_without_streams_or_with_stray_segments_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(!verify_dir(dir.path(), VerifyOptions::default()).passed());
    std::fs::write(dir.path().join("seg-12.jsonl"), b"").expect("write");
    let report = verify_dir(dir.path(), VerifyOptions::default());
    assert!(report.problems.iter().any(|p| p.contains("not a valid segment name")), "{report:#?}");
    assert!(!verify_dir(&dir.path().join("missing"), VerifyOptions::default()).passed());
}

#[test]
fn several_streams_are_verified_separately() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["a", "b"] {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).expect("mkdir");
        write(&sub, &layout(&build(vec![]), &[]));
    }
    let mut broken = layout(&build(vec![]), &[]);
    broken[0].1.remove(1);
    let sub = dir.path().join("c");
    std::fs::create_dir(&sub).expect("mkdir");
    write(&sub, &broken);
    let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert_eq!(report.streams.len(), 3);
    assert!(report.streams[0].passed() && report.streams[1].passed());
    assert!(!report.streams[2].passed());
    assert!(!report.passed());
}
