//! The decision log: what is written verifies, and every edit, removal or reordering of a
//! record is found and named by its line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use clap::{CommandFactory, Parser, Subcommand};
use portcullis::audit::{
    Action, AuditError, AuditLog, BadRecord, Entry, GENESIS_PREV, Keys, LogOptions, Problem,
    Record, Start, VerifyFailure, key_id, segments, verify, verify_bytes, verify_files,
};
use portcullis::cli::audit::{AuditArgs, AuditCommand, run, run_to, run_verify};
use portcullis::policy::{Decision, Item, Reason, Verdict};
use proptest::prelude::*;
use serde_json::Value;

const KEY: &[u8] = b"k7Qm2VxP9sLr4TbN8wYc3JfH6dGa5ZeU";
const OTHER_KEY: &[u8] = b"k7Qm2VxP9sLr4TbN8wYc3JfH6dGa5ZeV";

fn small(i: usize) -> i64 {
    i64::try_from(i).expect("a small index")
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000 + seconds, 0).unwrap()
}

fn decision(stage: &str, verdict: Verdict, reason: Reason, resource: &str) -> Decision {
    Decision {
        stage: stage.into(),
        field: "spec.stages[0].permissions[0]".into(),
        item: Item::Kubernetes {
            api_group: String::new(),
            resource: resource.into(),
            verb: "get".into(),
            resource_names: vec![],
        },
        verdict,
        reason,
        message: format!("about {resource}: \"quoted\", back\\slash, ünïcødé"),
        guardrail: None,
    }
}

/// The entries of one reconcile: decisions, then the objects applied.
fn batch(n: usize) -> Vec<Entry> {
    let sa = "system:serviceaccount:ml-fraud:fraud-detector-ingest";
    let mut entries = vec![
        Entry::from_decision(
            "ml-fraud",
            "fraud-detector",
            Some(i64::try_from(n).expect("a small count")),
            sa,
            &decision(
                "ingest",
                Verdict::Allow,
                Reason::WithinGuardrail,
                "configmaps",
            ),
        ),
        Entry::from_decision(
            "ml-fraud",
            "fraud-detector",
            Some(i64::try_from(n).expect("a small count")),
            sa,
            &decision("ingest", Verdict::Deny, Reason::WildcardForbidden, "*"),
        ),
    ];
    let mut created = Entry::new(
        Action::Create,
        "ml-fraud",
        "fraud-detector",
        "created the Role",
    );
    created.stage = Some("ingest".into());
    created.object = Some("Role ml-fraud/fraud-detector-ingest".into());
    created.generation = Some(i64::try_from(n).expect("a small count"));
    entries.push(created);
    entries
}

/// A log of `batches` appends of 3 records each, one second apart.
fn write_log(path: &Path, batches: usize) -> Vec<Record> {
    let mut log = AuditLog::open(path, KEY).unwrap();
    let mut records = Vec::new();
    for i in 0..batches {
        records.extend(
            log.append(&batch(i), at(i64::try_from(i).expect("a small index")))
                .unwrap(),
        );
    }
    records
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn bad(path: &Path, key: &[u8]) -> BadRecord {
    match verify(path, key) {
        Err(VerifyFailure::Bad { record, .. }) => record,
        Err(e) => panic!("expected a bad record, got: {e}"),
        Ok(s) => panic!("expected a bad record, but {} records verify", s.records),
    }
}

fn new_log(batches: usize) -> (tempfile::TempDir, PathBuf, Vec<Record>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let records = write_log(&path, batches);
    (dir, path, records)
}

#[test]
fn a_written_log_verifies() {
    let (_dir, path, records) = new_log(4);
    assert_eq!(records.len(), 12);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        let prev = if i == 0 {
            GENESIS_PREV
        } else {
            &records[i - 1].hash
        };
        assert_eq!(r.prev, prev);
    }
    let summary = verify(&path, KEY).unwrap();
    assert_eq!(summary.records, 12);
    assert_eq!(summary.first_time, Some(at(0)));
    assert_eq!(summary.last_time, Some(at(3)));
    assert_eq!(summary.last_hash, records[11].hash);
    let by_action: Vec<(Action, u64)> = summary.by_action.into_iter().collect();
    assert_eq!(
        by_action,
        [(Action::Grant, 4), (Action::Deny, 4), (Action::Create, 4)]
    );
    let by_verdict: Vec<(String, u64)> = summary.by_verdict.into_iter().collect();
    assert_eq!(by_verdict, [("Allow".into(), 4), ("Deny".into(), 4)]);
    // What append returned is what is in the file.
    let in_file: Vec<Record> = lines(&path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(in_file, records);
}

#[test]
fn an_empty_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    std::fs::write(&path, "").unwrap();
    let summary = verify(&path, KEY).unwrap();
    assert_eq!(summary.records, 0);
    assert_eq!(summary.first_time, None);
}

#[test]
fn a_deny_turned_allow_is_found_on_its_line() {
    let (_dir, path, records) = new_log(3);
    let mut text = lines(&path);
    // Record 5 is the second batch's denial.
    assert_eq!(records[4].verdict.as_deref(), Some("Deny"));
    text[4] = text[4].replace(r#""verdict":"Deny""#, r#""verdict":"Allow""#);
    write_lines(&path, &text);
    let found = bad(&path, KEY);
    assert_eq!(
        found,
        BadRecord {
            line: 5,
            seq: Some(5),
            problem: Problem::Edited
        }
    );
}

/// A value of another type or content for every field.
fn edit(value: &Value) -> Value {
    match value {
        Value::Null => Value::String("x".into()),
        Value::String(s) if s == "grant" => Value::String("deny".into()),
        Value::String(s) if s == "deny" || s == "create" => Value::String("prune".into()),
        Value::String(s) if s.len() == 64 => {
            // A hash: change one hex digit.
            let mut s = s.clone();
            let last = if s.ends_with('0') { "1" } else { "0" };
            s.replace_range(63.., last);
            Value::String(s)
        }
        Value::String(s) if s.ends_with('Z') && s.contains('T') => {
            Value::String(s.replace(".000Z", ".001Z"))
        }
        Value::String(s) => Value::String(format!("{s}!")),
        Value::Number(n) => Value::from(n.as_u64().unwrap() + 1),
        Value::Object(fields) => {
            // A structured item: the verb changed, as a record turned into another grant.
            let mut fields = fields.clone();
            fields.insert("verb".into(), Value::String("delete".into()));
            Value::Object(fields)
        }
        other => panic!("no edit for {other}"),
    }
}

fn edited_key_id(record: &Value) -> String {
    record["keyId"].as_str().unwrap().to_string()
}

#[test]
fn editing_any_field_of_any_record_is_found_on_its_line() {
    let (_dir, path, _) = new_log(3);
    let original = lines(&path);
    let fields: Vec<String> = serde_json::from_str::<serde_json::Map<String, Value>>(&original[0])
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(fields.len(), 20);
    for i in 0..original.len() {
        for field in &fields {
            let mut record: Value = serde_json::from_str(&original[i]).unwrap();
            let edited = edit(&record[field.as_str()]);
            record[field.as_str()] = edited;
            let mut text = original.clone();
            text[i] = serde_json::to_string(&record).unwrap();
            write_lines(&path, &text);
            let found = bad(&path, KEY);
            assert_eq!(
                found.line,
                i as u64 + 1,
                "{field} of line {}: {found}",
                i + 1
            );
            // seq edits name the seq the line now has.
            let seq = record["seq"].as_u64();
            assert_eq!(found.seq, seq, "{field} of line {}", i + 1);
            let expected = if field == "keyId" {
                Problem::UnknownKey(edited_key_id(&record))
            } else if i == 0 {
                Problem::EditedOrWrongKey
            } else {
                Problem::Edited
            };
            assert_eq!(found.problem, expected, "{field} of line {}", i + 1);
        }
    }
}

#[test]
fn a_removed_record_is_found_where_it_was() {
    let (_dir, path, _) = new_log(3);
    let mut text = lines(&path);
    text.remove(3);
    write_lines(&path, &text);
    let found = bad(&path, KEY);
    assert_eq!(found.line, 4);
    assert_eq!(found.seq, Some(5));
    assert_eq!(
        found.problem,
        Problem::RemovedOrReordered("seq 5 follows seq 3".into())
    );
}

#[test]
fn swapped_records_are_found_at_the_first() {
    let (_dir, path, _) = new_log(3);
    let mut text = lines(&path);
    text.swap(5, 7);
    write_lines(&path, &text);
    let found = bad(&path, KEY);
    assert_eq!((found.line, found.seq), (6, Some(8)));
    assert!(matches!(found.problem, Problem::RemovedOrReordered(_)));
}

#[test]
fn a_cut_head_is_found_at_line_1() {
    let (_dir, path, _) = new_log(3);
    let text = lines(&path);
    write_lines(&path, &text[2..]);
    let found = bad(&path, KEY);
    assert_eq!((found.line, found.seq), (1, Some(3)));
    assert!(
        found.problem.to_string().starts_with(
            "removed or reordered: the first record has seq 3, not 1: the records before it are missing"
        ),
        "{found}"
    );
}

#[test]
fn a_record_of_another_chain_is_found() {
    // A second log with the same key: its record 2 has seq 2 and a valid hash, but it follows
    // that log's record 1, not this one's.
    let (dir, path, _) = new_log(2);
    let other = dir.path().join("other.jsonl");
    let mut shuffled = batch(9);
    shuffled.swap(0, 1);
    AuditLog::open(&other, KEY)
        .unwrap()
        .append(&shuffled, at(100))
        .unwrap();
    let mut text = lines(&path);
    text[1] = lines(&other)[1].clone();
    write_lines(&path, &text);
    let found = bad(&path, KEY);
    assert_eq!((found.line, found.seq), (2, Some(2)));
    assert_eq!(
        found.problem,
        Problem::RemovedOrReordered("its prev is not the hash of the record before it".into())
    );
}

#[test]
fn another_key_fails_at_line_1() {
    let (_dir, path, _) = new_log(2);
    let found = bad(&path, OTHER_KEY);
    assert_eq!((found.line, found.seq), (1, Some(1)));
    assert!(matches!(found.problem, Problem::UnknownKey(_)), "{found}");
    assert!(
        found
            .to_string()
            .contains("edited, or written with another key"),
        "{found}"
    );
}

#[test]
fn reopening_continues_the_chain() {
    let (_dir, path, first) = new_log(2);
    let mut log = AuditLog::open(&path, KEY).unwrap();
    assert_eq!(log.last_seq(), 6);
    assert_eq!(log.last_hash(), first[5].hash);
    assert_eq!(log.truncated_tail(), None);
    let more = log.append(&batch(7), at(60)).unwrap();
    assert_eq!(more[0].seq, 7);
    assert_eq!(more[0].prev, first[5].hash);
    assert_eq!(more[2].seq, 9);
    drop(log);
    let summary = verify(&path, KEY).unwrap();
    assert_eq!(summary.records, 9);
    assert_eq!(summary.last_time, Some(at(60)));
}

#[test]
fn a_torn_last_line_is_removed_on_open_and_the_chain_continues() {
    let (_dir, path, records) = new_log(2);
    let whole = std::fs::read(&path).unwrap();
    // A crash in the middle of appending record 7: half its line, no newline.
    let next = Record::new(&batch(5)[0], 7, at(30), &records[5].hash, KEY).to_line();
    let torn = &next.as_bytes()[..next.len() / 2];
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(torn)
        .unwrap();

    // verify says what it is ...
    let found = bad(&path, KEY);
    assert_eq!((found.line, found.problem), (7, Problem::Incomplete));

    // ... and open removes it.
    let mut log = AuditLog::open(&path, KEY).unwrap();
    assert_eq!(log.truncated_tail(), Some(torn.len() as u64));
    assert_eq!(log.last_seq(), 6);
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    let more = log.append(&batch(6), at(40)).unwrap();
    assert_eq!(more[0].seq, 7);
    assert_eq!(more[0].prev, records[5].hash);
    drop(log);
    assert_eq!(verify(&path, KEY).unwrap().records, 9);
}

#[test]
fn a_whole_record_without_its_newline_is_torn_too() {
    let (_dir, path, records) = new_log(1);
    let next = Record::new(&batch(5)[0], 4, at(30), &records[2].hash, KEY).to_line();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(next.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let found = bad(&path, KEY);
    assert_eq!(
        (found.line, found.seq, found.problem),
        (4, Some(4), Problem::Incomplete)
    );
    let log = AuditLog::open(&path, KEY).unwrap();
    assert_eq!(log.truncated_tail(), Some(next.len() as u64));
    assert_eq!(log.last_seq(), 3);
}

#[test]
fn an_edited_log_is_not_appended_to() {
    let (_dir, path, _) = new_log(3);
    let mut text = lines(&path);
    text[4] = text[4].replace(r#""verdict":"Deny""#, r#""verdict":"Allow""#);
    write_lines(&path, &text);
    let before = std::fs::read(&path).unwrap();
    let err = AuditLog::open(&path, KEY).unwrap_err();
    let AuditError::Broken { record, .. } = &err else {
        panic!("expected a broken chain, got: {err}")
    };
    assert_eq!((record.line, record.seq), (5, Some(5)));
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 5 (seq 5): edited"), "{message}");
    assert!(message.contains("move the file aside"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_log_written_with_another_key_is_not_appended_to() {
    let (_dir, path, _) = new_log(1);
    let err = AuditLog::open(&path, OTHER_KEY).unwrap_err();
    let AuditError::Broken { record, .. } = &err else {
        panic!("expected a broken chain, got: {err}")
    };
    assert_eq!(record.line, 1);
    assert!(matches!(record.problem, Problem::UnknownKey(_)), "{record}");
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let log = AuditLog::open(&path, KEY).unwrap();
    let err = AuditLog::open(&path, KEY).unwrap_err();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
    drop(log);
    AuditLog::open(&path, KEY).unwrap();
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn appended_lines_are_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let echo = Shared::default();
    let mut log = AuditLog::open(&path, KEY)
        .unwrap()
        .with_echo(Box::new(echo.clone()));
    log.append(&batch(0), at(0)).unwrap();
    log.append(&batch(1), at(1)).unwrap();
    assert_eq!(*echo.0.lock().unwrap(), std::fs::read(&path).unwrap());
    assert_eq!(log.echo_failures(), 0);
}

#[test]
fn a_hundred_entries_in_one_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut log = AuditLog::open(&path, KEY).unwrap();
    let entries: Vec<Entry> = (0..34).flat_map(batch).take(100).collect();
    let records = log.append(&entries, at(0)).unwrap();
    assert_eq!(records.len(), 100);
    assert_eq!(log.last_seq(), 100);
    assert_eq!(verify(&path, KEY).unwrap().records, 100);
}

// The command line.

fn verify_args(file: &Path, key: &Path) -> AuditArgs {
    AuditArgs {
        command: AuditCommand::Verify {
            files: vec![file.to_path_buf()],
            key: vec![key.to_path_buf()],
            prev: None,
        },
    }
}

fn cli(file: &Path, key: &Path) -> (u8, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_to(&verify_args(file, key), &mut out, &mut err);
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    let (out, err) = (text(out), text(err));
    for s in [&out, &err] {
        // No Rust internals: Debug output of io errors or structs.
        assert!(
            !s.contains("Os {") && !s.contains("kind:") && !s.contains("Some("),
            "{s}"
        );
    }
    (code, out, err)
}

fn key_file(dir: &Path, key: &[u8]) -> PathBuf {
    let path = dir.join("key");
    let mut text = key.to_vec();
    text.push(b'\n');
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn cli_verify_prints_a_summary() {
    let (dir, path, records) = new_log(2);
    let key = key_file(dir.path(), KEY);
    let (code, out, err) = cli(&path, &key);
    assert_eq!((code, err.as_str()), (0, ""));
    let file = path.display();
    assert_eq!(
        out,
        format!(
            "{file}: 6 records, seq 1 to 6, every one verifies\n  from 2025-06-15T15:06:40.000Z to 2025-06-15T15:06:41.000Z\n  last hash {} (records removed from the end leave a valid chain: compare seq 6 and this hash with a copy kept elsewhere)\n  by action:\n    grant   2\n    deny    2\n    create  2\n  by verdict: Allow 2, Deny 2\n",
            records[5].hash
        )
    );
    assert_eq!(run(&verify_args(&path, &key)), 0);
}

#[test]
fn cli_verify_names_the_first_bad_record() {
    let (dir, path, _) = new_log(2);
    let key = key_file(dir.path(), KEY);
    let mut text = lines(&path);
    text[1] = text[1].replace(r#""verdict":"Deny""#, r#""verdict":"Allow""#);
    write_lines(&path, &text);
    let (code, out, err) = cli(&path, &key);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "error: {}: line 2 (seq 2): edited: the hash does not match the record; the records from here on cannot be trusted\n",
            path.display()
        )
    );
    assert_eq!(run(&verify_args(&path, &key)), 1);

    let other = key_file(&dir.path().join(".."), OTHER_KEY);
    let (code, _, err) = cli(&path, &other);
    std::fs::remove_file(&other).unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains(": line 1 (seq 1): edited, or written with another key"),
        "{err}"
    );
}

#[test]
fn cli_verify_unreadable_inputs_exit_2() {
    let (dir, path, _) = new_log(1);
    let key = key_file(dir.path(), KEY);
    let missing = dir.path().join("missing.jsonl");
    let (code, out, err) = cli(&missing, &key);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.starts_with(&format!(
            "error: cannot read the decision log {}: ",
            missing.display()
        )),
        "{err}"
    );

    let (code, _, err) = cli(&path, &dir.path().join("nokey"));
    assert_eq!(code, 2);
    assert!(err.starts_with("error: key file "), "{err}");
    assert!(err.contains("cannot read it"), "{err}");

    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let (code, _, err) = cli(&path, &short);
    assert_eq!(code, 2);
    assert!(
        err.contains("head -c 32 /dev/urandom | base64 > key"),
        "{err}"
    );
    assert_eq!(run(&verify_args(&path, &short)), 2);
}

/// The arguments as they parse once `audit` is a subcommand of `portcullis`.
#[derive(Parser)]
#[command(name = "portcullis")]
struct Wired {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    Audit(AuditArgs),
}

#[test]
fn cli_arguments_parse() {
    Wired::command().debug_assert();
    let Wired {
        command: Top::Audit(args),
    } = Wired::try_parse_from(["portcullis", "audit", "verify", "log.jsonl", "--key", "k"])
        .unwrap();
    let AuditCommand::Verify { files, key, prev } = args.command else {
        panic!("audit verify parses as Verify");
    };
    assert_eq!(
        (files, key, prev),
        (
            vec![PathBuf::from("log.jsonl")],
            vec![PathBuf::from("k")],
            None
        )
    );
    assert!(Wired::try_parse_from(["portcullis", "audit", "verify", "log.jsonl"]).is_err());
}

// Any single-byte change is found.

fn text_strategy() -> impl Strategy<Value = String> {
    // Printable text, with the characters JSON escapes and some that are not ASCII.
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::char::range('a', 'z'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just('/'),
            1 => Just(' '),
            1 => Just('é'),
            1 => Just('→'),
            1 => Just('0'),
        ],
        0..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn entry_strategy() -> impl Strategy<Value = Entry> {
    (
        proptest::sample::select(Action::ALL.to_vec()),
        text_strategy(),
        proptest::option::of(text_strategy()),
        proptest::option::of(prop_oneof![Just("Allow".to_string()), Just("Deny".into())]),
        proptest::option::of(-5i64..100_000),
    )
        .prop_map(|(action, message, object, verdict, generation)| {
            let mut e = Entry::new(action, "ml-fraud", "fraud-detector", message);
            e.stage = Some("ingest".into());
            e.object = object;
            e.verdict = verdict;
            e.generation = generation;
            e
        })
}

fn log_bytes(batches: &[Vec<Entry>]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut log = AuditLog::open(&path, KEY).unwrap();
    for (i, entries) in batches.iter().enumerate() {
        log.append(
            entries,
            at(small(i) * 7) + chrono::Duration::milliseconds(small(i) * 13),
        )
        .unwrap();
    }
    drop(log);
    std::fs::read(&path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_single_byte_edit_is_found(
        batches in proptest::collection::vec(proptest::collection::vec(entry_strategy(), 1..4), 1..4),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let original = log_bytes(&batches);
        prop_assert!(verify_bytes(&original, KEY).is_ok());
        let at = position.index(original.len());
        prop_assume!(original[at] != byte);
        let mut edited = original.clone();
        edited[at] = byte;
        let result = verify_bytes(&edited, KEY);
        prop_assert!(result.is_err(), "byte {at} {:?} -> {:?} went unnoticed", original[at] as char, byte as char);
        // The record named is the one edited (an edited newline names the line it ends).
        let line = original[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let found = result.unwrap_err();
        prop_assert_eq!(found.line, line, "found {}", found);
    }
}

/// An edit that leaves every value of the record as it was changes nothing the record says, and
/// is not an edit to the chain: the hash covers the record's values, not its bytes. The only such
/// single-byte edit of a line the writer produced is the case of a hex digit in a `\u00XX` escape,
/// which serde_json writes for control characters.
#[test]
fn an_edit_that_changes_no_value_is_not_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut log = AuditLog::open(&path, KEY).unwrap();
    log.append(
        &[Entry::new(Action::Grant, "n", "p", "bell \u{1f} here")],
        at(0),
    )
    .unwrap();
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(r"bell \u001f here"), "{text}");
    let same = text.replace(r"\u001f", r"\u001F");
    assert_eq!(verify_bytes(same.as_bytes(), KEY).unwrap().records, 1);
}

/// Every position, every byte value, for one small log (run with `--ignored`; about a minute in a
/// debug build).
#[test]
#[ignore = "exhaustive; the proptest samples the same property"]
fn every_single_byte_edit_is_found() {
    let mut tricky = Entry::new(Action::VaultFailed, "ns", "p", "a \"b\" \\c/ é → 0");
    tricky.generation = Some(-3);
    tricky.object = Some(String::new());
    let original = log_bytes(&[batch(0), vec![tricky]]);
    for at in 0..original.len() {
        let line = original[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        for byte in 0..=255u8 {
            if byte == original[at] {
                continue;
            }
            let mut edited = original.clone();
            edited[at] = byte;
            match verify_bytes(&edited, KEY) {
                Ok(_) => panic!("byte {at} -> {byte} went unnoticed"),
                Err(found) => assert_eq!(found.line, line, "byte {at} -> {byte}: {found}"),
            }
        }
    }
}

// Segments, key rotation and checking from a later point.

fn small_segments() -> LogOptions {
    LogOptions {
        max_segment_bytes: 4 * 1024,
        keep_segments: 0,
        writer: Some("portcullis-0".into()),
    }
}

fn segmented_log(dir: &Path, batches: usize, options: &LogOptions) -> PathBuf {
    let path = dir.join("decisions.jsonl");
    let mut log = AuditLog::open_with(&path, &Keys::one(KEY), options.clone()).unwrap();
    for n in 0..batches {
        log.append(&batch(n), at(small(n))).unwrap();
    }
    path
}

#[test]
fn the_log_is_sealed_into_segments_that_verify_as_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = segmented_log(dir.path(), 40, &small_segments());
    let files = segments(&path).unwrap();
    assert!(files.len() > 3, "{files:?}");
    for f in &files {
        // No segment is more than one append past the limit.
        assert!(
            std::fs::metadata(f).unwrap().len() <= 4 * 1024 + 2048,
            "{f:?}"
        );
    }
    let summary = verify_files(&files, &Keys::one(KEY), &Start::Genesis).unwrap();
    assert_eq!((summary.records, summary.last_seq), (120, 120));
    // Every record names its writer.
    let line = &lines(files.last().unwrap())[0];
    assert!(line.contains(r#""writer":"portcullis-0""#), "{line}");

    // Reopened, the writer continues after the newest sealed segment.
    let mut log = AuditLog::open_with(&path, &Keys::one(KEY), small_segments()).unwrap();
    assert_eq!(log.last_seq(), 120);
    log.append(&batch(41), at(100)).unwrap();
    let summary =
        verify_files(&segments(&path).unwrap(), &Keys::one(KEY), &Start::Genesis).unwrap();
    assert_eq!(summary.last_seq, 123);

    // The command line finds the segments from the active file.
    let key = key_file(dir.path(), KEY);
    let (code, out, err) = cli(&path, &key);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("123 records in "), "{out}");
}

#[test]
fn a_removed_segment_is_found_and_a_later_one_checks_from_its_prev() {
    let dir = tempfile::tempdir().unwrap();
    let path = segmented_log(dir.path(), 40, &small_segments());
    let files = segments(&path).unwrap();
    // The second segment removed: the third does not follow the first.
    let mut gap = files.clone();
    gap.remove(1);
    let Err(VerifyFailure::Bad {
        path: at_file,
        record,
    }) = verify_files(&gap, &Keys::one(KEY), &Start::Genesis)
    else {
        panic!("a missing segment verified")
    };
    assert_eq!((at_file, record.line), (files[2].clone(), 1));
    assert!(matches!(record.problem, Problem::RemovedOrReordered(_)));

    // The oldest segments gone (a retention window): checking from the hash before the first
    // kept record works, and a wrong hash is found.
    let before = lines(&files[0]).last().cloned().unwrap();
    let hash = serde_json::from_str::<Value>(&before).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let kept = &files[1..];
    let summary = verify_files(kept, &Keys::one(KEY), &Start::After(hash.clone())).unwrap();
    assert_eq!(summary.last_seq, 120);
    assert!(verify_files(kept, &Keys::one(KEY), &Start::After(GENESIS_PREV.into())).is_err());
    let Err(VerifyFailure::Bad { record, .. }) =
        verify_files(kept, &Keys::one(KEY), &Start::Genesis)
    else {
        panic!("a log without its head verified from the genesis")
    };
    assert!(record.problem.to_string().contains("--prev"), "{record}");

    // The same through the command line, with the segments named and `--prev`.
    let key = key_file(dir.path(), KEY);
    let args = AuditArgs {
        command: AuditCommand::Verify {
            files: kept.to_vec(),
            key: vec![key],
            prev: Some(hash),
        },
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_to(&args, &mut out, &mut err),
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
}

#[test]
fn standard_input_is_verified() {
    let (dir, path, _) = new_log(2);
    let key = key_file(dir.path(), KEY);
    let bytes = std::fs::read(&path).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_verify(
        &[PathBuf::from("-")],
        std::slice::from_ref(&key),
        None,
        &mut bytes.as_slice(),
        &mut out,
        &mut err,
    );
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(String::from_utf8(out).unwrap().contains("6 records"));
    let mut edited = lines(&path);
    edited[3] = edited[3].replace(r#""ml-fraud""#, r#""ml-frauds""#);
    let edited = format!("{}\n", edited.join("\n"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_verify(
        &[PathBuf::from("-")],
        &[key],
        None,
        &mut edited.as_bytes(),
        &mut out,
        &mut err,
    );
    assert_eq!(code, 1);
    assert!(
        String::from_utf8(err)
            .unwrap()
            .contains("line 4 (seq 4): edited")
    );
}

#[test]
fn after_a_key_rotation_each_record_is_checked_with_its_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    AuditLog::open(&path, KEY)
        .unwrap()
        .append(&batch(0), at(0))
        .unwrap();
    // The operator restarted with a new key, the old one kept to check what it signed.
    let rotated = Keys::with_previous(OTHER_KEY, &[KEY]);
    let mut log = AuditLog::open_with(&path, &rotated, LogOptions::default()).unwrap();
    assert_eq!(log.key_id(), key_id(OTHER_KEY));
    log.append(&batch(1), at(1)).unwrap();
    drop(log);

    assert_eq!(
        verify_files(std::slice::from_ref(&path), &rotated, &Start::Genesis)
            .unwrap()
            .records,
        6
    );
    // Only the new key: the first records are named as written with another key.
    let Err(VerifyFailure::Bad { record, .. }) = verify_files(
        std::slice::from_ref(&path),
        &Keys::one(OTHER_KEY),
        &Start::Genesis,
    ) else {
        panic!("verified without the old key")
    };
    assert_eq!(record.line, 1);
    assert_eq!(record.problem, Problem::UnknownKey(key_id(KEY)));
    // Without the old key the operator does not append either: it cannot check the chain.
    assert!(matches!(
        AuditLog::open(&path, OTHER_KEY),
        Err(AuditError::Broken { .. })
    ));
    // The command line takes both keys.
    let (k1, k2) = (key_file(dir.path(), OTHER_KEY), dir.path().join("old-key"));
    std::fs::write(&k2, KEY).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_verify(&[path], &[k1, k2], None, &mut &b""[..], &mut out, &mut err);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
}

#[test]
fn only_the_newest_segments_are_kept_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        keep_segments: 2,
        ..small_segments()
    };
    let path = segmented_log(dir.path(), 40, &options);
    let files = segments(&path).unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    let first = serde_json::from_str::<Value>(&lines(&files[0])[0]).unwrap();
    assert!(first["seq"].as_u64().unwrap() > 1);
    // What is left still verifies from the prev of its first record.
    let prev = first["prev"].as_str().unwrap().to_string();
    assert_eq!(
        verify_files(&files, &Keys::one(KEY), &Start::After(prev))
            .unwrap()
            .last_seq,
        120
    );
    // And the writer still opens it.
    assert_eq!(
        AuditLog::open_with(&path, &Keys::one(KEY), options)
            .unwrap()
            .last_seq(),
        120
    );
}
