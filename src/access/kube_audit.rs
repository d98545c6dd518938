//! The Kubernetes API server's audit events (`audit.k8s.io/v1`), as far as runtime access
//! records read them. k8s-openapi has no audit types; these are the fields used, and every other
//! field is ignored.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{Observation, Source, Verdict};

/// What the audit webhook backend POSTs: a batch of events.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventList {
    #[serde(default)]
    pub items: Vec<Event>,
}

/// One audit event.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `RequestReceived`, `ResponseStarted`, `ResponseComplete` or `Panic`.
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub verb: String,
    #[serde(default)]
    pub user: UserInfo,
    #[serde(default, rename = "sourceIPs")]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub user_agent: Option<String>,
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    #[serde(default, rename = "requestURI")]
    pub request_uri: Option<String>,
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    #[serde(default)]
    pub stage_timestamp: Option<DateTime<Utc>>,
    #[serde(default)]
    pub request_received_timestamp: Option<DateTime<Utc>>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub api_group: Option<String>,
    #[serde(default)]
    pub subresource: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseStatus {
    #[serde(default)]
    pub code: Option<u16>,
}

/// The annotation the authorizer sets: `allow` or `forbid`.
pub const DECISION_ANNOTATION: &str = "authorization.k8s.io/decision";

/// The ServiceAccount usernames' prefix; other users are never a stage.
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

impl Event {
    /// Whether this is the one event of a request that is counted: `ResponseComplete` (or
    /// `Panic`). `RequestReceived` and `ResponseStarted` describe the same request again.
    pub fn is_final(&self) -> bool {
        matches!(self.stage.as_str(), "ResponseComplete" | "Panic")
    }

    /// Whether the user may be a stage's ServiceAccount: the cheap test every event passes
    /// before anything else is done with it.
    pub fn is_service_account(&self) -> bool {
        self.user.username.starts_with(SERVICE_ACCOUNT_PREFIX)
    }

    /// Allow or Deny: the authorizer's decision, or (when the event has no annotations, at
    /// level None or from an older API server) a 403 response.
    pub fn verdict(&self) -> Verdict {
        match self
            .annotations
            .get(DECISION_ANNOTATION)
            .map(String::as_str)
        {
            Some("allow") => Verdict::Allow,
            Some(_) => Verdict::Deny,
            None if self.response_status.as_ref().and_then(|s| s.code) == Some(403) => {
                Verdict::Deny
            }
            None => Verdict::Allow,
        }
    }

    /// The event as an observation, taking its user as is.
    pub fn into_observation(self, received: DateTime<Utc>) -> Observation {
        let verdict = self.verdict();
        let time = self
            .stage_timestamp
            .or(self.request_received_timestamp)
            .unwrap_or(received);
        let (api_group, resource, subresource, name, namespace) = match self.object_ref {
            Some(o) => (
                o.api_group.unwrap_or_default(),
                o.resource.unwrap_or_default(),
                o.subresource,
                o.name,
                o.namespace,
            ),
            // A non-resource request (`/healthz`, `/apis`): its path is what was asked.
            None => (
                String::new(),
                self.request_uri
                    .map(|u| u.split('?').next().unwrap_or_default().to_string())
                    .unwrap_or_default(),
                None,
                None,
                None,
            ),
        };
        Observation {
            source: Source::Kubernetes,
            user: self.user.username,
            verb: self.verb,
            api_group,
            resource,
            subresource,
            name,
            namespace,
            verdict,
            source_ip: self.source_ips.into_iter().next(),
            user_agent: self.user_agent,
            time,
        }
    }
}

/// `system:serviceaccount:<namespace>:<name>` split, when it is one.
pub fn service_account(username: &str) -> Option<(&str, &str)> {
    username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)?
        .split_once(':')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":[
      {"level":"Metadata","auditID":"a1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/ml/secrets","verb":"list",
       "user":{"username":"system:serviceaccount:ml:fraud-ingest","groups":["system:serviceaccounts"]},
       "sourceIPs":["10.0.0.7"],"userAgent":"curl/8","objectRef":{"resource":"secrets","namespace":"ml","apiVersion":"v1"},
       "responseStatus":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403},
       "requestReceivedTimestamp":"2026-11-27T08:00:00.000000Z","stageTimestamp":"2026-11-27T08:00:00.002000Z",
       "annotations":{"authorization.k8s.io/decision":"forbid","authorization.k8s.io/reason":""}},
      {"level":"Metadata","auditID":"a2","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/ml/configmaps/cfg","verb":"get",
       "user":{"username":"alice"},"sourceIPs":["10.0.0.8"],
       "objectRef":{"resource":"configmaps","namespace":"ml","name":"cfg","apiVersion":"v1"},
       "annotations":{"authorization.k8s.io/decision":"allow"}}]}"#;

    #[test]
    fn an_event_list_reads_as_observations() {
        let list: EventList = serde_json::from_str(LIST).unwrap();
        assert_eq!(list.items.len(), 2);
        let first = &list.items[0];
        assert!(first.is_final() && first.is_service_account());
        assert_eq!(first.verdict(), Verdict::Deny);
        assert!(!list.items[1].is_service_account());
        let obs = list
            .items
            .into_iter()
            .next()
            .unwrap()
            .into_observation(Utc::now());
        assert_eq!(obs.verb, "list");
        assert_eq!(obs.resource, "secrets");
        assert_eq!(obs.namespace.as_deref(), Some("ml"));
        assert_eq!(obs.source_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(obs.time.to_rfc3339(), "2026-11-27T08:00:00.002+00:00");
    }

    #[test]
    fn only_well_formed_service_account_names_split() {
        assert_eq!(
            service_account("system:serviceaccount:ml:fraud-ingest"),
            Some(("ml", "fraud-ingest"))
        );
        assert_eq!(service_account("system:serviceaccount:ml"), None);
        assert_eq!(service_account("system:serviceaccount::x"), None);
        assert_eq!(service_account("system:serviceaccount:ml:a:b"), None);
        assert_eq!(service_account("system:node:ml"), None);
    }
}
