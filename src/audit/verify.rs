//! Checking a log: every line a record, `seq` consecutive, each `prev` the hash of the record
//! before, each hash recomputed with the key its `keyId` names; across the segments of a log,
//! each segment continuing the one before.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Action, GENESIS_PREV, Keys, Record, hash_fields};

/// What a log that verifies holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// The number of records.
    pub records: u64,
    /// The `seq` of the first record (1 unless the log is checked from a later segment).
    pub first_seq: Option<u64>,
    /// The `seq` of the last record; 0 when there is none.
    pub last_seq: u64,
    /// The `time` of the first record.
    pub first_time: Option<DateTime<Utc>>,
    /// The `time` of the last record.
    pub last_time: Option<DateTime<Utc>>,
    /// The `hash` of the last record ([`GENESIS_PREV`] when there is none). Compare it, and
    /// `last_seq`, with a copy kept elsewhere: records removed from the end of a log leave a
    /// valid chain.
    pub last_hash: String,
    /// The `keyId` of the last record, if it has one.
    pub last_key_id: Option<String>,
    /// How many files (segments) were read.
    pub files: usize,
    /// Records by action.
    pub by_action: BTreeMap<Action, u64>,
    /// Records by verdict (`Allow`, `Deny`); records without a verdict are not counted.
    pub by_verdict: BTreeMap<String, u64>,
}

impl Default for VerifySummary {
    fn default() -> Self {
        VerifySummary {
            records: 0,
            first_seq: None,
            last_seq: 0,
            first_time: None,
            last_time: None,
            last_hash: GENESIS_PREV.to_string(),
            last_key_id: None,
            files: 0,
            by_action: BTreeMap::new(),
            by_verdict: BTreeMap::new(),
        }
    }
}

/// Where the chain being checked begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// At the beginning: the first record is seq 1 with a `prev` of 64 zeros.
    Genesis,
    /// After a record whose hash is known (from the segment before, or a copy kept elsewhere,
    /// such as a SIEM that holds only a retention window): the first record's `prev` must be
    /// it; its `seq` is taken as it is.
    After(String),
    /// After a record whose hash is known, with its `seq`: the first record must be `seq + 1`.
    AfterSeq { seq: u64, hash: String },
    /// Wherever the first record says (the operator opening a log whose older segments were
    /// removed): a first record of seq 1 must still have a `prev` of 64 zeros.
    Anywhere,
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
    /// The record names a key (`keyId`) that was not given.
    UnknownKey(String),
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
            Problem::UnknownKey(id) => write!(
                f,
                "edited, or written with another key: its keyId {id:?} names none of the keys given (after a key rotation, give the earlier key too)"
            ),
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

/// Verifies the log at `path` with `key`, from its beginning: every line a record, `seq`
/// consecutive from 1, each `prev` the hash of the record before, and each hash what `key`
/// gives. For a log in segments, see [`verify_files`] and [`segments`].
pub fn verify(path: impl AsRef<Path>, key: &[u8]) -> Result<VerifySummary, VerifyFailure> {
    verify_files(
        &[path.as_ref().to_path_buf()],
        &Keys::one(key),
        &Start::Genesis,
    )
}

/// Verifies `files` as one chain, in the order given (each segment continues the one before),
/// from `start`, with `keys`. Each file is read a line at a time.
pub fn verify_files(
    files: &[PathBuf],
    keys: &Keys,
    start: &Start,
) -> Result<VerifySummary, VerifyFailure> {
    let mut chain = ChainState::new(start);
    for path in files {
        let file = File::open(path).map_err(|source| VerifyFailure::Unreadable {
            path: path.clone(),
            source,
        })?;
        check_one(BufReader::new(file), keys, &mut chain, path)?;
    }
    Ok(chain.summary)
}

/// Verifies one stream of records (a file, or standard input) from `start`.
pub fn verify_reader(
    reader: impl BufRead,
    keys: &Keys,
    start: &Start,
    name: &Path,
) -> Result<VerifySummary, VerifyFailure> {
    let mut chain = ChainState::new(start);
    check_one(reader, keys, &mut chain, name)?;
    Ok(chain.summary)
}

fn check_one(
    reader: impl BufRead,
    keys: &Keys,
    chain: &mut ChainState,
    path: &Path,
) -> Result<(), VerifyFailure> {
    match check_stream(reader, keys, chain) {
        Ok(end) if end.tail.is_empty() => Ok(()),
        Ok(end) => Err(VerifyFailure::Bad {
            path: path.to_path_buf(),
            record: BadRecord {
                line: end.lines + 1,
                seq: seq_of(&end.tail),
                problem: Problem::Incomplete,
            },
        }),
        Err(StreamError::Io(source)) => Err(VerifyFailure::Unreadable {
            path: path.to_path_buf(),
            source,
        }),
        Err(StreamError::Bad(record)) => Err(VerifyFailure::Bad {
            path: path.to_path_buf(),
            record,
        }),
    }
}

/// The files of the log whose active file is `path`, oldest first: the sealed segments beside
/// it (`<path>.<first seq, 20 digits>`), then `path` itself when it exists.
pub fn segments(path: impl AsRef<Path>) -> std::io::Result<Vec<PathBuf>> {
    let path = path.as_ref();
    let mut files = sealed_segments(path)?;
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// The sealed segments of the log whose active file is `path`, oldest first.
pub(crate) fn sealed_segments(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let prefix = format!("{name}.");
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(suffix) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if suffix.len() == SEGMENT_DIGITS
            && suffix.bytes().all(|b| b.is_ascii_digit())
            && let Ok(seq) = suffix.parse::<u64>()
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The digits of a sealed segment's suffix: its first `seq`, zero-padded, so that names sort in
/// the order of the chain.
pub(crate) const SEGMENT_DIGITS: usize = 20;

/// [`verify`] for the contents of a log, from its beginning, with one key.
pub fn verify_bytes(bytes: &[u8], key: &[u8]) -> Result<VerifySummary, BadRecord> {
    let mut chain = ChainState::new(&Start::Genesis);
    match check_stream(bytes, &Keys::one(key), &mut chain) {
        Ok(end) if end.tail.is_empty() => Ok(chain.summary),
        Ok(end) => Err(BadRecord {
            line: end.lines + 1,
            seq: seq_of(&end.tail),
            problem: Problem::Incomplete,
        }),
        Err(StreamError::Bad(record)) => Err(record),
        Err(StreamError::Io(e)) => unreachable!("reading a slice cannot fail: {e}"),
    }
}

/// The chain so far, across the files of a log.
pub(crate) struct ChainState {
    pub summary: VerifySummary,
    start: Start,
}

impl ChainState {
    pub(crate) fn new(start: &Start) -> ChainState {
        ChainState {
            summary: VerifySummary::default(),
            start: start.clone(),
        }
    }
}

/// How a stream of records ended.
pub(crate) struct StreamEnd {
    /// Complete lines read.
    pub lines: u64,
    /// Their length in bytes; what follows is `tail`.
    pub complete_len: u64,
    /// A last line without its newline (empty when there is none).
    pub tail: Vec<u8>,
}

pub(crate) enum StreamError {
    Io(std::io::Error),
    Bad(BadRecord),
}

/// Verifies every complete line of `reader` (those that end with a newline), continuing
/// `chain`, and leaves what follows the last newline to the caller. Holds one line at a time.
pub(crate) fn check_stream(
    mut reader: impl BufRead,
    keys: &Keys,
    chain: &mut ChainState,
) -> Result<StreamEnd, StreamError> {
    let mut line = Vec::new();
    let mut end = StreamEnd {
        lines: 0,
        complete_len: 0,
        tail: Vec::new(),
    };
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(StreamError::Io)?;
        if n == 0 {
            return Ok(end);
        }
        if line.last() != Some(&b'\n') {
            end.tail = std::mem::take(&mut line);
            return Ok(end);
        }
        end.lines += 1;
        let record =
            check_line(&line[..n - 1], end.lines, chain, keys).map_err(StreamError::Bad)?;
        end.complete_len += n as u64;
        let summary = &mut chain.summary;
        if summary.records == 0 {
            summary.first_seq = Some(record.seq);
        }
        summary.records += 1;
        summary.last_seq = record.seq;
        summary.first_time.get_or_insert(record.time);
        summary.last_time = Some(record.time);
        *summary.by_action.entry(record.action).or_default() += 1;
        if let Some(verdict) = &record.verdict {
            *summary.by_verdict.entry(verdict.clone()).or_default() += 1;
        }
        summary.last_key_id.clone_from(&record.key_id);
        summary.last_hash = record.hash;
    }
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

/// Checks line `line` of its file (from 1), the next record of `chain`.
fn check_line(
    bytes: &[u8],
    line: u64,
    chain: &ChainState,
    keys: &Keys,
) -> Result<Record, BadRecord> {
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
    let key_id = match fields.get("keyId") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.as_str()),
        Some(_) => {
            return Err(bad(
                seq,
                Problem::NotARecord("its keyId is not a string".into()),
            ));
        }
    };
    let first = chain.summary.records == 0;
    let Some(key) = keys.for_id(key_id) else {
        // An unknown id on an edited record is still an edit: an attacker without any key can
        // write any id. Say what is certain: no key given checks it.
        return Err(bad(
            seq,
            Problem::UnknownKey(key_id.unwrap_or_default().to_string()),
        ));
    };
    let hash_value = fields.remove("hash").expect("checked above");
    if hash_fields(&key.mac, &claimed_prev, &fields) != hash {
        let problem = if first {
            Problem::EditedOrWrongKey
        } else {
            Problem::Edited
        };
        return Err(bad(seq, problem));
    }
    fields.insert("hash".into(), hash_value);
    let record = Record::deserialize(Value::Object(fields))
        .map_err(|e| bad(seq, Problem::NotARecord(json_error(&e))))?;
    follows(&record, chain).map_err(|detail| bad(seq, Problem::RemovedOrReordered(detail)))?;
    Ok(record)
}

/// Whether `record` may come next in `chain`: its `seq` one more than the last one's, its
/// `prev` the last one's hash; for the first record, what `start` says.
fn follows(record: &Record, chain: &ChainState) -> Result<(), String> {
    if chain.summary.records > 0 {
        let last = chain.summary.last_seq;
        if record.seq != last + 1 {
            return Err(format!("seq {} follows seq {last}", record.seq));
        }
        if record.prev != chain.summary.last_hash {
            return Err("its prev is not the hash of the record before it".into());
        }
        return Ok(());
    }
    let genesis = |record: &Record| {
        if record.seq != 1 {
            Err(format!(
                "the first record has seq {}, not 1: the records before it are missing (when older segments were removed on purpose, give the hash of record {} with --prev)",
                record.seq,
                record.seq.saturating_sub(1)
            ))
        } else if record.prev != GENESIS_PREV {
            Err("the first record's prev is not 64 zeros: it was not the first of its chain".into())
        } else {
            Ok(())
        }
    };
    match &chain.start {
        Start::Genesis => genesis(record),
        Start::Anywhere if record.seq == 1 => genesis(record),
        Start::Anywhere => Ok(()),
        Start::After(hash) if record.prev != *hash => Err(format!(
            "the first record's prev is not {hash}, the hash it should follow"
        )),
        Start::After(_) => Ok(()),
        Start::AfterSeq { seq, hash } => {
            if record.seq != seq + 1 {
                Err(format!(
                    "the first record has seq {}, but the segment before ends at seq {seq}",
                    record.seq
                ))
            } else if record.prev != *hash {
                Err("the first record's prev is not the hash of the last record of the segment before".into())
            } else {
                Ok(())
            }
        }
    }
}
