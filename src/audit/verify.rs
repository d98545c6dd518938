//! Checking a log: every line a record, `seq` consecutive from 1, each `prev` the hash of the
//! record before, each hash recomputed with the key.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Action, GENESIS_PREV, HmacSha256, Record, hash_fields, mac};

/// What a log that verifies holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// The number of records; also the `seq` of the last one.
    pub records: u64,
    /// The `time` of the first record.
    pub first_time: Option<DateTime<Utc>>,
    /// The `time` of the last record.
    pub last_time: Option<DateTime<Utc>>,
    /// The `hash` of the last record ([`GENESIS_PREV`] when there is none). Compare it, and
    /// `records`, with a copy kept elsewhere: records removed from the end of a log leave a valid
    /// chain.
    pub last_hash: String,
    /// Records by action.
    pub by_action: BTreeMap<Action, u64>,
    /// Records by verdict (`Allow`, `Deny`); records without a verdict are not counted.
    pub by_verdict: BTreeMap<String, u64>,
}

impl Default for VerifySummary {
    fn default() -> Self {
        VerifySummary {
            records: 0,
            first_time: None,
            last_time: None,
            last_hash: GENESIS_PREV.to_string(),
            by_action: BTreeMap::new(),
            by_verdict: BTreeMap::new(),
        }
    }
}

/// What is wrong with the first record that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The line is not a JSON record (with what is wrong).
    NotARecord(String),
    /// The last line has no newline at its end: a write that did not finish.
    Incomplete,
    /// The hash does not match the record: it was changed after it was written.
    Edited,
    /// The first record's hash does not match: it was changed, or the key is not the one the
    /// log was written with (a wrong key fails on the first record).
    EditedOrWrongKey,
    /// `seq` or `prev` does not follow from the record before (with which).
    RemovedOrReordered(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotARecord(detail) => write!(f, "not a record: {detail}"),
            Problem::Incomplete => f.write_str(
                "not a record: the last line has no newline at its end, as a write cut short by a crash leaves it (the operator removes it when it next opens the log)",
            ),
            Problem::Edited => f.write_str("edited: the hash does not match the record"),
            Problem::EditedOrWrongKey => f.write_str(
                "edited, or the key is not the one the log was written with: the hash does not match the record",
            ),
            Problem::RemovedOrReordered(detail) => write!(f, "removed or reordered: {detail}"),
        }
    }
}

/// The first record that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The line in the file, from 1.
    pub line: u64,
    /// The record's `seq`, when the line has one.
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Why a log does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFailure {
    /// The file could not be read.
    #[error("cannot read the decision log {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    /// A record does not verify; it and every record after it cannot be trusted.
    #[error("{}: {record}", path.display())]
    Bad { path: PathBuf, record: BadRecord },
}

/// Verifies the log at `path` with `key`: every line a record, `seq` consecutive from 1, each
/// `prev` the hash of the record before, and each hash what `key` gives.
pub fn verify(path: impl AsRef<Path>, key: &[u8]) -> Result<VerifySummary, VerifyFailure> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| VerifyFailure::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    verify_bytes(&bytes, key).map_err(|record| VerifyFailure::Bad {
        path: path.to_path_buf(),
        record,
    })
}

/// [`verify`] for the contents of a log.
pub fn verify_bytes(bytes: &[u8], key: &[u8]) -> Result<VerifySummary, BadRecord> {
    let chain = check(bytes, &mac(key))?;
    let tail = &bytes[chain.complete_len..];
    if !tail.is_empty() {
        return Err(BadRecord {
            line: chain.summary.records + 1,
            seq: seq_of(tail),
            problem: Problem::Incomplete,
        });
    }
    Ok(chain.summary)
}

/// The complete lines of a log that verify.
pub(crate) struct Chain {
    pub summary: VerifySummary,
    /// The length of the complete lines; what follows is a last line without a newline.
    pub complete_len: usize,
}

/// Verifies every complete line of `bytes` (those that end with a newline) and leaves what
/// follows the last newline to the caller.
pub(crate) fn check(bytes: &[u8], mac: &HmacSha256) -> Result<Chain, BadRecord> {
    let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut summary = VerifySummary::default();
    // Every piece ends with its newline, since the slice ends with one.
    for (i, line) in bytes[..complete_len]
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
    {
        let line = &line[..line.len() - 1];
        let record = check_line(line, i as u64 + 1, &summary.last_hash, mac)?;
        summary.records = record.seq;
        summary.first_time.get_or_insert(record.time);
        summary.last_time = Some(record.time);
        *summary.by_action.entry(record.action).or_default() += 1;
        if let Some(verdict) = &record.verdict {
            *summary.by_verdict.entry(verdict.clone()).or_default() += 1;
        }
        summary.last_hash = record.hash;
    }
    Ok(Chain {
        summary,
        complete_len,
    })
}

fn seq_of(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(line)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// serde_json's message without its " at line 1 column N", which would be confusing next to
/// the line in the file.
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(message) if e.column() > 0 => format!("{message} (column {})", e.column()),
        Some(message) => message.to_string(),
        None => text,
    }
}

/// Checks line `line` (from 1), which follows records 1 to `line - 1` whose last hash is `prev`.
fn check_line(bytes: &[u8], line: u64, prev: &str, mac: &HmacSha256) -> Result<Record, BadRecord> {
    let bad = |seq, problem| BadRecord { line, seq, problem };
    if bytes.is_empty() {
        return Err(bad(None, Problem::NotARecord("the line is empty".into())));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(None, Problem::NotARecord(json_error(&e))))?;
    let Value::Object(mut fields) = value else {
        return Err(bad(
            None,
            Problem::NotARecord("the line is not a JSON object".into()),
        ));
    };
    let seq = fields.get("seq").and_then(Value::as_u64);
    let text = |fields: &Map<String, Value>, name: &str| match fields.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(bad(
            seq,
            Problem::NotARecord(format!("it has no {name:?} string")),
        )),
    };
    // The hash first: an edit that also makes the record malformed is still an edit.
    let hash = text(&fields, "hash")?;
    let claimed_prev = text(&fields, "prev")?;
    let hash_value = fields.remove("hash").expect("checked above");
    if hash_fields(mac, &claimed_prev, &fields) != hash {
        let problem = if line == 1 {
            Problem::EditedOrWrongKey
        } else {
            Problem::Edited
        };
        return Err(bad(seq, problem));
    }
    fields.insert("hash".into(), hash_value);
    let record = Record::deserialize(Value::Object(fields))
        .map_err(|e| bad(seq, Problem::NotARecord(json_error(&e))))?;
    if record.seq != line {
        let detail = if line == 1 {
            format!(
                "the first record has seq {}, not 1: the records before it are missing",
                record.seq
            )
        } else {
            format!("seq {} follows seq {}", record.seq, line - 1)
        };
        return Err(bad(seq, Problem::RemovedOrReordered(detail)));
    }
    if record.prev != prev {
        let detail = if line == 1 {
            "the first record's prev is not 64 zeros: it was not the first of its chain".to_string()
        } else {
            "its prev is not the hash of the record before it".to_string()
        };
        return Err(bad(seq, Problem::RemovedOrReordered(detail)));
    }
    Ok(record)
}
