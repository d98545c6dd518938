//! Object names and labels: deterministic, valid DNS-1123 labels of at most 63 characters.
//!
//! A name is `<pipeline>-<stage>` when that already is a valid label. Otherwise (too long, or a
//! pipeline name with dots) it is cleaned, cut, and given an 8-character hash of the full
//! (namespace, pipeline, stage), so that two long names that share a prefix never collide.

use sha2::{Digest, Sha256};

/// The longest DNS-1123 label.
const MAX_LABEL: usize = 63;

/// The label every object Portcullis manages carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "portcullis");
/// The label naming the pipeline an object belongs to.
pub const PIPELINE_LABEL: &str = "portcullis.dev/pipeline";
/// The label naming the stage an object belongs to.
pub const STAGE_LABEL: &str = "portcullis.dev/stage";
/// An AIPipeline annotation: a new value asks for a reconcile now (recorded once per value).
pub const RECONCILE_ANNOTATION: &str = "portcullis.dev/reconcile";
/// An AIPipeline annotation: a new value rotates the pipeline's credentials now (once per value).
pub const ROTATE_NOW_ANNOTATION: &str = "portcullis.dev/rotate-now";

fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..4])
}

/// `parts` joined by '-' when that is a valid DNS-1123 label; otherwise cleaned, cut, and
/// suffixed with a hash of `identity`.
fn join_within(parts: &[&str], identity: &[&str]) -> String {
    let joined = parts.join("-");
    if crate::api::validate::is_dns_label(&joined) {
        return joined;
    }
    let cleaned: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let hash = short_hash(identity);
    let keep = MAX_LABEL - hash.len() - 1;
    let head = cleaned[..cleaned.len().min(keep)].trim_matches('-');
    if head.is_empty() {
        hash
    } else {
        format!("{head}-{hash}")
    }
}

/// The name of a stage's ServiceAccount, Role, RoleBinding and NetworkPolicy: `<pipeline>-<stage>`.
pub(crate) fn stage_object(namespace: &str, pipeline: &str, stage: &str) -> String {
    join_within(&[pipeline, stage], &[namespace, pipeline, stage])
}

/// The name of a stage's Vault ACL policy and Kubernetes-auth role: `<namespace>-<pipeline>-<stage>`.
pub(crate) fn vault_object(namespace: &str, pipeline: &str, stage: &str) -> String {
    join_within(&[namespace, pipeline, stage], &[namespace, pipeline, stage])
}

/// A label value: at most 63 characters, cut with a hash when longer.
pub(crate) fn label_value(value: &str) -> String {
    if value.len() <= MAX_LABEL {
        return value.to_string();
    }
    let hash = short_hash(&[value]);
    let head = value[..MAX_LABEL - hash.len() - 1].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::is_dns_label;

    #[test]
    fn short_names_are_readable() {
        assert_eq!(
            stage_object("ml", "fraud-detector", "ingest"),
            "fraud-detector-ingest"
        );
        assert_eq!(
            vault_object("ml", "fraud-detector", "ingest"),
            "ml-fraud-detector-ingest"
        );
    }

    #[test]
    fn long_names_are_cut_with_a_hash_and_stay_unique() {
        let long = "a".repeat(100);
        let a = stage_object("ml", &long, "ingest");
        let b = stage_object("ml", &long, "ingesu");
        assert!(a.len() <= 63 && is_dns_label(&a), "{a}");
        assert_ne!(a, b);
        assert_ne!(
            stage_object("ml", &long, "x"),
            stage_object("other", &long, "x")
        );
    }

    #[test]
    fn dotted_pipeline_names_become_labels() {
        let n = stage_object("ml", "fraud.v2", "train");
        assert!(is_dns_label(&n), "{n}");
        assert_ne!(n, stage_object("ml", "fraud-v2", "train"));
    }

    #[test]
    fn label_values_fit() {
        let v = label_value(&"p".repeat(200));
        assert!(v.len() <= 63);
        assert_eq!(label_value("fraud"), "fraud");
    }
}
