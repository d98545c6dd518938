//! Runtime access records: what a stage's identity does with what it was granted.
//!
//! The decision log records what Portcullis decides. This module turns what a stage then
//! *does* — every request its ServiceAccount makes to the Kubernetes API (from the API server's
//! audit events, [`kube_audit`]) and every Vault request its token makes (from Vault's audit
//! device, [`vault_audit`]) — into `access` records in the same chain, raises `anomaly` records
//! (and Events and metrics, in the controller) and keeps per-grant usage for
//! `status.stages[].usage` and `portcullis usage --suggest`.
//!
//! Everything here is pure and synchronous: a [`Directory`] says which identities are stages,
//! and a [`Tracker`] turns [`Observation`]s into [`Output`]s, given the time. The operator
//! (`controller::access`) and `portcullis audit ingest` feed the same tracker, so the records
//! of a managed cluster's exported audit log are those the operator would have written.

pub mod directory;
pub mod kube_audit;
pub mod tracker;
pub mod vault_audit;

use std::fmt;

use chrono::{DateTime, Utc};

pub use directory::{Directory, Grant, StageInfo};
pub use tracker::{Anomaly, AnomalyKind, Output, PodIps, Thresholds, Tracker, UsageUpdate};

/// Where an observation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Kubernetes,
    Vault,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Kubernetes => "kubernetes",
            Source::Vault => "vault",
        }
    }
}

/// Whether the request was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "Allow",
            Verdict::Deny => "Deny",
        }
    }
}

/// One request a (possible) stage identity made, as read from an audit event. For Vault, the
/// `verb` is the operation (`read`, `list`, ...), `resource` the path and `api_group` `vault`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub source: Source,
    /// The user as the API server names it, such as `system:serviceaccount:ml:fraud-ingest`.
    pub user: String,
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub verdict: Verdict,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub time: DateTime<Utc>,
}

/// The longest user agent, source address or name copied into a record; longer ones are cut
/// (a client chooses its user agent, and must not choose the size of our records).
pub const MAX_FIELD_LEN: usize = 256;

pub(crate) fn bounded(text: &str) -> String {
    if text.len() <= MAX_FIELD_LEN {
        return text.to_string();
    }
    let mut cut = text[..text.floor_char_boundary(MAX_FIELD_LEN - 3)].to_string();
    cut.push_str("...");
    cut
}

impl Observation {
    /// The resource with its subresource, such as `pods/log`.
    pub fn full_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }
}

impl fmt::Display for Observation {
    /// Like a decided item: `get configmaps/ingest-config`, `list secrets`,
    /// `get deployments.apps/web`, `vault read kv/data/x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source == Source::Vault {
            return write!(f, "vault {} {}", self.verb, self.resource);
        }
        write!(f, "{} {}", self.verb, self.full_resource())?;
        if !self.api_group.is_empty() {
            write!(f, ".{}", self.api_group)?;
        }
        if let Some(name) = &self.name {
            write!(f, "/{name}")?;
        }
        Ok(())
    }
}
