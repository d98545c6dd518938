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

mod ecs;
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
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::policy::{Decision, Item};

pub use ecs::{ECS_VERSION, to_ecs};
pub use verify::{
    BadRecord, Problem, Start, VerifyFailure, VerifySummary, segments, verify, verify_bytes,
    verify_files, verify_reader,
};
pub use writer::{AuditLog, LogOptions};

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
    /// Someone asked for a reconcile with the `portcullis.dev/reconcile` annotation.
    ReconcileRequested,
    /// The admission webhook refused an AIPipeline (invalid, or asking for what an enforcing
    /// guardrail denies).
    AdmissionDenied,
    /// A RoleBinding or ClusterRoleBinding Portcullis does not manage reaches a stage's
    /// ServiceAccount (the foreign-grant watchdog).
    ForeignGrant,
    /// What a stage's identity did at runtime: a request to the Kubernetes API or to Vault
    /// (allowed ones counted per window, refused ones one by one). See [`crate::access`].
    Access,
    /// Something unusual in what a stage's identity did: its `reason` is the kind
    /// (`AccessDenied`, `TokenUsedOutsidePods`, `NewBehaviour`, `VolumeSpike`).
    Anomaly,
}

impl Action {
    /// Every action, in the order of the declaration.
    pub const ALL: [Action; 19] = [
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
        Action::ReconcileRequested,
        Action::AdmissionDenied,
        Action::ForeignGrant,
        Action::Access,
        Action::Anomaly,
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
            Action::ReconcileRequested => "reconcile-requested",
            Action::AdmissionDenied => "admission-denied",
            Action::ForeignGrant => "foreign-grant",
            Action::Access => "access",
            Action::Anomaly => "anomaly",
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
    /// The AIPipeline's `metadata.uid`: a pipeline deleted and created again under the same
    /// name is another pipeline.
    pub pipeline_uid: Option<String>,
    /// For a decision, the AccessGuardrail that decided it (the first one, when several bound
    /// the item), or none when the built-in floor or the defaults did.
    pub guardrail: Option<String>,
    /// For a decision, the decided item as structured data: the `item` of `plan -o json`.
    pub item: Option<Value>,
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
            pipeline_uid: None,
            guardrail: None,
            item: None,
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
            pipeline_uid: None,
            guardrail: decision.guardrail.clone(),
            item: Some(item_value(&decision.field, &decision.item)),
        }
    }
}

/// The `schemaVersion` of the records this build writes. Version 1 records (before
/// `schemaVersion`, `writer`, `pipelineUid`, `guardrail`, `item` and `keyId`) still verify: the
/// hash covers the fields a line has, whatever they are.
pub const SCHEMA_VERSION: u32 = 2;

/// A decided item as structured data: its kind, the field of the spec it was asked in, and its
/// parts (a record's `item`).
pub fn item_value(field: &str, item: &Item) -> Value {
    let mut value = match item {
        Item::Kubernetes {
            api_group,
            resource,
            verb,
            resource_names,
        } => json!({
            "apiGroup": api_group,
            "resource": resource,
            "verb": verb,
            "resourceNames": resource_names,
        }),
        Item::Dns => json!({}),
        Item::Egress(rule) => json!({ "rule": serde_json::to_value(&rule.rule).ok() }),
        Item::Ingress(rule) => json!({ "rule": serde_json::to_value(&rule.rule).ok() }),
        Item::VaultPath { path, capability } => json!({
            "path": path,
            "capability": serde_json::to_value(capability).ok(),
        }),
        Item::VaultTokenTtl { seconds } => json!({ "ttlSeconds": seconds }),
        Item::Credential {
            name,
            path,
            ttl_seconds,
            secret_name,
        } => json!({
            "name": name,
            "path": path,
            "ttlSeconds": ttl_seconds,
            "secretName": secret_name,
        }),
        Item::RestartTarget {
            credential,
            kind,
            name,
        } => json!({
            "credential": credential,
            "workloadKind": serde_json::to_value(kind).ok(),
            "name": name,
        }),
    };
    if let Value::Object(fields) = &mut value {
        fields.insert("kind".into(), json!(item.kind()));
        fields.insert("field".into(), json!(field));
    }
    value
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The record format; see [`SCHEMA_VERSION`]. Absent, and read as 1, in the first format.
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    /// 1 for the first record, then one more for each.
    pub seq: u64,
    /// When the record was appended, to the millisecond.
    #[serde(with = "millis")]
    pub time: DateTime<Utc>,
    /// Which writer's chain this is (the replica's name; each shard and replica keeps its own
    /// chain in its own file).
    #[serde(default)]
    pub writer: Option<String>,
    pub action: Action,
    pub namespace: String,
    pub pipeline: String,
    #[serde(default)]
    pub pipeline_uid: Option<String>,
    pub stage: Option<String>,
    pub subject: Option<String>,
    pub object: Option<String>,
    /// The decided item as structured data (decisions), or the request (`access` and
    /// `anomaly` records).
    #[serde(default)]
    pub item: Option<Value>,
    pub verdict: Option<String>,
    pub reason: Option<String>,
    /// The AccessGuardrail that decided (decisions only).
    #[serde(default)]
    pub guardrail: Option<String>,
    pub message: String,
    pub generation: Option<i64>,
    /// Which key the hash is keyed with ([`key_id`]): after a key rotation, `audit verify`
    /// picks each record's key by it.
    #[serde(default)]
    pub key_id: Option<String>,
    /// The `hash` of the record before, or [`GENESIS_PREV`].
    pub prev: String,
    /// Hex HMAC-SHA256 of `prev`, a newline and the canonical JSON of the rest of the record.
    pub hash: String,
}

fn schema_v1() -> u32 {
    1
}

impl Record {
    /// The record for `entry`, hashed with `key`.
    pub fn new(entry: &Entry, seq: u64, time: DateTime<Utc>, prev: &str, key: &[u8]) -> Record {
        Record::signed(entry, seq, time, prev, &SigningKey::new(key), None)
    }

    pub(crate) fn signed(
        entry: &Entry,
        seq: u64,
        time: DateTime<Utc>,
        prev: &str,
        key: &SigningKey,
        writer: Option<&str>,
    ) -> Record {
        let mut record = Record {
            schema_version: SCHEMA_VERSION,
            seq,
            time,
            writer: writer.map(str::to_string),
            action: entry.action,
            namespace: entry.namespace.clone(),
            pipeline: entry.pipeline.clone(),
            pipeline_uid: entry.pipeline_uid.clone(),
            stage: entry.stage.clone(),
            subject: entry.subject.clone(),
            object: entry.object.clone(),
            item: entry.item.clone(),
            verdict: entry.verdict.clone(),
            reason: entry.reason.clone(),
            guardrail: entry.guardrail.clone(),
            message: entry.message.clone(),
            generation: entry.generation,
            key_id: Some(key.id.clone()),
            prev: prev.to_string(),
            hash: String::new(),
        };
        record.hash = record.hash_with(&key.mac);
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

/// The id of `key` as records carry it in `keyId`: the first 16 hex digits of a SHA-256 of the
/// key under a fixed label. It names the key without revealing anything usable about it (the
/// key is at least 256 bits of randomness).
pub fn key_id(key: &[u8]) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"portcullis decision-log key id\n");
    h.update(key);
    hex::encode(&h.finalize()[..8])
}

/// A key ready to sign or check records, with its id.
#[derive(Clone)]
pub(crate) struct SigningKey {
    pub id: String,
    pub mac: HmacSha256,
}

impl SigningKey {
    pub(crate) fn new(key: &[u8]) -> SigningKey {
        SigningKey {
            id: key_id(key),
            mac: mac(key),
        }
    }
}

/// The keys a log is checked with: the current one, and earlier ones a key rotation left
/// records under. Each record is checked with the key its `keyId` names; a record of the first
/// format (no `keyId`) with the current key.
#[derive(Clone)]
pub struct Keys {
    current: SigningKey,
    previous: Vec<SigningKey>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keys {
    /// Only `key`.
    pub fn one(key: &[u8]) -> Keys {
        Keys {
            current: SigningKey::new(key),
            previous: Vec::new(),
        }
    }

    /// `current`, and earlier keys whose records it should still verify.
    pub fn with_previous<K: AsRef<[u8]>>(current: &[u8], previous: &[K]) -> Keys {
        Keys {
            current: SigningKey::new(current),
            previous: previous
                .iter()
                .map(|k| SigningKey::new(k.as_ref()))
                .collect(),
        }
    }

    /// The id of the current key.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    pub(crate) fn current(&self) -> &SigningKey {
        &self.current
    }

    /// The key for a record with this `keyId`.
    pub(crate) fn for_id(&self, id: Option<&str>) -> Option<&SigningKey> {
        match id {
            None => Some(&self.current),
            Some(id) => std::iter::once(&self.current)
                .chain(&self.previous)
                .find(|k| k.id == id),
        }
    }
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
