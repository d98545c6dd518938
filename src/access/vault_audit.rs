//! Vault's (and OpenBao's) audit device entries, as far as runtime access records read them.
//!
//! A `file` device writes one JSON object per line; a `socket` device sends the same lines
//! over TCP. Each request appears twice (`type` `request`, then `response`); only responses
//! are counted. Vault HMACs tokens, accessors and (unless configured otherwise) the data: the
//! fields read here are the operation, the path, the remote address, the error, and the auth
//! metadata of the Kubernetes auth method (`role`, `service_account_name`,
//! `service_account_namespace`), none of which is secret. Nothing else is copied.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{Observation, Source, Verdict};

/// One line of a Vault audit device.
#[derive(Debug, Deserialize)]
pub struct Entry {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub auth: Option<Auth>,
    #[serde(default)]
    pub request: Option<Request>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Auth {
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub struct Request {
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub remote_address: Option<String>,
}

impl Entry {
    /// The ServiceAccount (namespace, name) the token was issued to by Kubernetes auth.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let meta = self.auth.as_ref()?.metadata.as_ref()?;
        Some((
            meta.get("service_account_namespace")?.as_str(),
            meta.get("service_account_name")?.as_str(),
        ))
    }

    /// The entry as an observation of `user` (the ServiceAccount's username), when it is a
    /// response to a request.
    pub fn into_observation(self, user: String, received: DateTime<Utc>) -> Option<Observation> {
        if self.kind != "response" {
            return None;
        }
        let request = self.request?;
        let denied = self
            .error
            .as_deref()
            .is_some_and(|e| e.contains("permission denied"));
        Some(Observation {
            source: Source::Vault,
            user,
            verb: request.operation,
            api_group: String::new(),
            resource: request.path,
            subresource: None,
            name: None,
            namespace: None,
            verdict: if denied {
                Verdict::Deny
            } else {
                Verdict::Allow
            },
            source_ip: request.remote_address,
            user_agent: None,
            time: self.time.unwrap_or(received),
        })
    }
}

/// Whether the Vault ACL path `pattern` matches `path`: `+` matches one segment, a trailing
/// `*` any suffix, as in Vault policies.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let (pattern, glob) = match pattern.strip_suffix('*') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let mut pat = pattern.split('/').peekable();
    let mut segs = path.split('/').peekable();
    loop {
        match (pat.next(), segs.peek()) {
            (None, None) => return true,
            (None, Some(_)) => return false,
            (Some(p), Some(s)) => {
                let last = pat.peek().is_none();
                if last && glob {
                    // The rest of the path must start with this (partial) segment.
                    let rest: Vec<&str> = segs.collect();
                    return rest.join("/").starts_with(p);
                }
                if p != "+" && p != *s {
                    return false;
                }
                segs.next();
            }
            (Some(p), None) => return glob && pat.peek().is_none() && p.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_path_patterns_match_like_vault_policies() {
        assert!(path_matches("kv/data/ml/*", "kv/data/ml/a/b"));
        assert!(path_matches("kv/data/ml/*", "kv/data/ml/"));
        assert!(path_matches("kv/data/ml*", "kv/data/ml-other"));
        assert!(!path_matches("kv/data/ml/*", "kv/data/other"));
        assert!(path_matches("kv/data/+/x", "kv/data/ml/x"));
        assert!(!path_matches("kv/data/+/x", "kv/data/ml/y/x"));
        assert!(path_matches("database/creds/r", "database/creds/r"));
        assert!(!path_matches("database/creds/r", "database/creds/r2"));
    }

    #[test]
    fn a_denied_response_reads_as_a_deny_and_nothing_hmaced_is_kept() {
        let line = r#"{"time":"2026-11-27T08:00:00Z","type":"response","auth":{"client_token":"hmac-sha256:abc","accessor":"hmac-sha256:def","metadata":{"role":"ml-fraud-ingest","service_account_name":"fraud-ingest","service_account_namespace":"ml"}},"request":{"operation":"read","path":"kv/data/other","remote_address":"10.1.2.3","client_token":"hmac-sha256:abc"},"error":"1 error occurred:\n\t* permission denied\n\n"}"#;
        let entry: Entry = serde_json::from_str(line).unwrap();
        assert_eq!(entry.service_account(), Some(("ml", "fraud-ingest")));
        let obs = entry
            .into_observation("system:serviceaccount:ml:fraud-ingest".into(), Utc::now())
            .unwrap();
        assert_eq!(obs.verdict, Verdict::Deny);
        assert_eq!(obs.to_string(), "vault read kv/data/other");
        assert!(!format!("{obs:?}").contains("hmac"));
    }
}
