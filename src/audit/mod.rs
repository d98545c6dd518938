//! The decision log: every access decision and every change Portcullis makes, one JSON line
//! each, chained so that an edited, removed or reordered record is found by
//! `portcullis audit verify`.
//!
//! # The record
//!
//! A [`Record`] is one line of JSON with all of these fields, always present (`null` when
//! empty), in this order:
//!
//! ```text
//! {"seq":1,"time":"2025-06-15T15:06:40.123Z","action":"grant","namespace":"ml-fraud",
//!  "pipeline":"fraud-detector","stage":"ingest",
//!  "subject":"system:serviceaccount:ml-fraud:fraud-detector-ingest",
//!  "object":"get configmaps/ingest-config","verdict":"Allow","reason":"WithinGuardrail",
//!  "message":"allowed by AccessGuardrail ml-ingestion","generation":3,
//!  "prev":"0000000000000000000000000000000000000000000000000000000000000000",
//!  "hash":"b9cb30f055d4f5348cbfdb003db4aff006671cac6be6b30608fb0817aba70ca9"}
//! ```
//!
//! (one line in the file; wrapped here; hashed with the key `k7Qm2VxP9sLr4TbN8wYc3JfH6dGa5ZeU`.) `seq` counts from 1 with no gaps; `time` is RFC 3339 UTC
//! with milliseconds, from the clock the caller passes in; `prev` is the `hash` of the record
//! before (64 zeros for the first); and
//!
//! ```text
//! hash = hex(HMAC-SHA256(key, prev || "\n" || canonical JSON of the record without "hash")),
//! ```
//!
//! where `prev` is the 64 hex characters of the `prev` field and the canonical JSON has its keys
//! sorted and no whitespace ([`canonical_json`]). Because the hash covers the parsed record, not
//! the bytes of the line, verification does not depend on the order of the fields in the file;
//! because it covers every field but `hash` (including fields a later version may add), no field
//! can be added, removed or changed without the hash showing it.
//!
//! # What the chain proves, and what it does not
//!
//! The hash is keyed: whoever can edit the file but does not hold the key cannot compute the
//! hash of an edited record, nor re-chain the records after a removed one. [`verify`] reports the
//! first record that does not check out; that record and every record after it cannot be trusted.
//!
//! Two things a hash chain cannot show by itself. Records removed *from the end* leave a shorter
//! chain that is still valid: compare the last `seq` and `hash` ([`VerifySummary`]) with a copy
//! kept elsewhere, such as the copy of every line the controller echoes to stdout for the
//! cluster's log collection ([`AuditLog::with_echo`]). And whoever holds the key can forge a
//! whole new chain: keep the key in a Secret only the operator reads.
//!
//! # Durability
//!
//! [`AuditLog::append`] returns only after the lines are written and `fsync`ed (`sync_data`), and
//! the controller makes the change a record describes only after that: a record is durable
//! before the change is made. A record therefore says "decided, and about to be applied"; when
//! applying fails, a later record says so (`vault-failed`, for one).
//!
//! A crash in the middle of a write can leave a last line without its newline. That record was
//! never acknowledged (append had not returned), so no change was made on its strength:
//! [`AuditLog::open`] removes it and reports how many bytes it removed
//! ([`AuditLog::truncated_tail`]). It is the only defect `open` repairs; any other refuses to
//! append ([`AuditError::Broken`]), since appending to a broken chain would make its new records
//! look as untrustworthy as the broken ones.

mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::policy::Decision;

pub use verify::{BadRecord, Problem, VerifyFailure, VerifySummary, verify, verify_bytes};
pub use writer::AuditLog;

/// The `prev` of the first record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The shortest key [`load_key`] and [`AuditLog::open`] accept, in bytes.
pub const MIN_KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A requested item is allowed.
    Grant,
    /// A requested item is denied.
    Deny,
    /// A Kubernetes object is created.
    Create,
    /// A Kubernetes object is changed.
    Update,
    /// An object the pipeline no longer needs is deleted.
    Prune,
    /// A change made by someone else to an owned object is undone.
    DriftReverted,
    /// An object with the name Portcullis would use exists and is not Portcullis's.
    AdoptionRefused,
    /// Dynamic credentials are issued.
    CredentialIssued,
    /// A credential lease is renewed.
    CredentialRenewed,
    /// Credentials are replaced by new ones.
    CredentialRotated,
    /// A credential lease is revoked.
    CredentialRevoked,
    /// A Vault ACL policy is written.
    PolicyWritten,
    /// A Vault Kubernetes-auth role is written.
    RoleWritten,
    /// A call to Vault failed.
    VaultFailed,
}

impl Action {
    /// Every action, in the order of the declaration.
    pub const ALL: [Action; 14] = [
        Action::Grant,
        Action::Deny,
        Action::Create,
        Action::Update,
        Action::Prune,
        Action::DriftReverted,
        Action::AdoptionRefused,
        Action::CredentialIssued,
        Action::CredentialRenewed,
        Action::CredentialRotated,
        Action::CredentialRevoked,
        Action::PolicyWritten,
        Action::RoleWritten,
        Action::VaultFailed,
    ];

    /// The name in the log, such as `drift-reverted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Grant => "grant",
            Action::Deny => "deny",
            Action::Create => "create",
            Action::Update => "update",
            Action::Prune => "prune",
            Action::DriftReverted => "drift-reverted",
            Action::AdoptionRefused => "adoption-refused",
            Action::CredentialIssued => "credential-issued",
            Action::CredentialRenewed => "credential-renewed",
            Action::CredentialRotated => "credential-rotated",
            Action::CredentialRevoked => "credential-revoked",
            Action::PolicyWritten => "policy-written",
            Action::RoleWritten => "role-written",
            Action::VaultFailed => "vault-failed",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller records: a [`Record`] without `seq`, `time`, `prev` and `hash`, which
/// [`AuditLog::append`] assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub action: Action,
    pub namespace: String,
    pub pipeline: String,
    pub stage: Option<String>,
    /// Who the decision is about, such as `system:serviceaccount:ml-fraud:fraud-detector-ingest`.
    pub subject: Option<String>,
    /// What the record is about, such as `Role ml-fraud/fraud-detector-ingest` or the text of a
    /// decided item.
    pub object: Option<String>,
    /// `Allow` or `Deny`, for decisions.
    pub verdict: Option<String>,
    /// The stable reason code of a decision, such as `WithinGuardrail`.
    pub reason: Option<String>,
    pub message: String,
    /// The AIPipeline's `metadata.generation` the record comes from.
    pub generation: Option<i64>,
}

impl Entry {
    /// An entry with only the required fields; set the others on the result.
    pub fn new(
        action: Action,
        namespace: impl Into<String>,
        pipeline: impl Into<String>,
        message: impl Into<String>,
    ) -> Entry {
        Entry {
            action,
            namespace: namespace.into(),
            pipeline: pipeline.into(),
            stage: None,
            subject: None,
            object: None,
            verdict: None,
            reason: None,
            message: message.into(),
            generation: None,
        }
    }

    /// The entry for one policy decision: `grant` or `deny` by its verdict, the decided item as
    /// the object, and the decision's stage, verdict, reason and message.
    pub fn from_decision(
        namespace: &str,
        pipeline: &str,
        generation: Option<i64>,
        subject: &str,
        decision: &Decision,
    ) -> Entry {
        let action = if decision.is_allowed() {
            Action::Grant
        } else {
            Action::Deny
        };
        Entry {
            action,
            namespace: namespace.to_string(),
            pipeline: pipeline.to_string(),
            stage: Some(decision.stage.clone()),
            subject: Some(subject.to_string()),
            object: Some(decision.item.to_string()),
            verdict: Some(decision.verdict.as_str().to_string()),
            reason: Some(decision.reason.as_str().to_string()),
            message: decision.message.clone(),
            generation,
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// 1 for the first record, then one more for each.
    pub seq: u64,
    /// When the record was appended, to the millisecond.
    #[serde(with = "millis")]
    pub time: DateTime<Utc>,
    pub action: Action,
    pub namespace: String,
    pub pipeline: String,
    pub stage: Option<String>,
    pub subject: Option<String>,
    pub object: Option<String>,
    pub verdict: Option<String>,
    pub reason: Option<String>,
    pub message: String,
    pub generation: Option<i64>,
    /// The `hash` of the record before, or [`GENESIS_PREV`].
    pub prev: String,
    /// Hex HMAC-SHA256 of `prev`, a newline and the canonical JSON of the rest of the record.
    pub hash: String,
}

impl Record {
    /// The record for `entry`, hashed with `key`.
    pub fn new(entry: &Entry, seq: u64, time: DateTime<Utc>, prev: &str, key: &[u8]) -> Record {
        Record::signed(entry, seq, time, prev, &mac(key))
    }

    pub(crate) fn signed(
        entry: &Entry,
        seq: u64,
        time: DateTime<Utc>,
        prev: &str,
        mac: &HmacSha256,
    ) -> Record {
        let mut record = Record {
            seq,
            time,
            action: entry.action,
            namespace: entry.namespace.clone(),
            pipeline: entry.pipeline.clone(),
            stage: entry.stage.clone(),
            subject: entry.subject.clone(),
            object: entry.object.clone(),
            verdict: entry.verdict.clone(),
            reason: entry.reason.clone(),
            message: entry.message.clone(),
            generation: entry.generation,
            prev: prev.to_string(),
            hash: String::new(),
        };
        record.hash = record.hash_with(mac);
        record
    }

    /// The hash this record should carry under `key`; it verifies when equal to `self.hash`.
    pub fn expected_hash(&self, key: &[u8]) -> String {
        self.hash_with(&mac(key))
    }

    fn hash_with(&self, mac: &HmacSha256) -> String {
        let Value::Object(mut fields) = serde_json::to_value(self).expect("records serialize")
        else {
            unreachable!("a record serializes to a JSON object")
        };
        fields.remove("hash");
        hash_fields(mac, &self.prev, &fields)
    }

    /// The line as it is written to the log, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    /// The `time` field as written: RFC 3339, UTC, milliseconds.
    pub fn time_text(&self) -> String {
        format_time(self.time)
    }
}

pub(crate) fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// The hash of a record whose fields other than `hash` are `fields`.
pub(crate) fn hash_fields(mac: &HmacSha256, prev: &str, fields: &Map<String, Value>) -> String {
    let mut mac = mac.clone();
    mac.update(prev.as_bytes());
    mac.update(b"\n");
    mac.update(canonical_json(&Value::Object(fields.clone())).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `value` as JSON with every object's keys sorted and no whitespace: the form that is hashed.
///
/// The keys are sorted here, not left to `serde_json::Map`: that map is sorted only while no
/// crate in the build turns on serde_json's `preserve_order` feature.
pub fn canonical_json(value: &Value) -> String {
    serde_json::to_string(&sorted(value)).expect("JSON values serialize")
}

fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

pub(crate) fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `time` as RFC 3339 UTC with milliseconds.
mod millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(time: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(*time))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| D::Error::custom(format!("time {text:?} is not RFC 3339: {e}")))
    }
}

/// Why the log could not be opened, appended to, or its key read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot {doing} the decision log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        doing: &'static str,
        source: io::Error,
    },
    #[error(
        "the decision log {} does not verify at {record}. Nothing is appended to a broken chain: move the file aside (keep it, it is evidence) and start again, which begins a new log; `portcullis audit verify` shows the same",
        path.display()
    )]
    Broken { path: PathBuf, record: BadRecord },
    #[error(
        "the decision log {} is open in another process; only one writer may append to a chain, so stop the other one first",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "an earlier append to the decision log {} failed and could not be undone; open the log again (restart), which removes an incomplete last line",
        path.display()
    )]
    Poisoned { path: PathBuf },
    #[error("key file {}: {problem}", path.display())]
    Key { path: PathBuf, problem: String },
    #[error(
        "the decision log key is {len} bytes; it must be at least {MIN_KEY_LEN}. Make one with `head -c 32 /dev/urandom | base64 > key`"
    )]
    ShortKey { len: usize },
}

/// Reads the key that the log's hashes are keyed with.
///
/// The key is the bytes of the file as they are, without trailing whitespace (so a key written
/// by `head -c 32 /dev/urandom | base64 > key` is its 44 base64 characters, not the 32 bytes they
/// encode: the same 256 bits of randomness, and a file that works whatever produced it). It must
/// be at least [`MIN_KEY_LEN`] bytes.
pub fn load_key(path: impl AsRef<Path>) -> Result<Vec<u8>, AuditError> {
    let path = path.as_ref();
    let mut key = std::fs::read(path).map_err(|e| AuditError::Key {
        path: path.to_path_buf(),
        problem: format!("cannot read it: {e}"),
    })?;
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    if key.len() < MIN_KEY_LEN {
        return Err(AuditError::Key {
            path: path.to_path_buf(),
            problem: format!(
                "the key is {} bytes; it must be at least {MIN_KEY_LEN}. Make one with `head -c 32 /dev/urandom | base64 > key`",
                key.len()
            ),
        });
    }
    Ok(key)
}
