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

/// The prefix of every Vault object the operator writes, unless `--vault-name-prefix` says
/// otherwise. The operator's own Vault policy is narrowed to it.
pub const DEFAULT_VAULT_NAME_PREFIX: &str = "portcullis-";

/// How many hex digits of the triple's hash a Vault name carries: 64 bits, so that no two
/// triples of one cluster share a name by chance (a collision needs about 4 billion triples).
const VAULT_HASH_HEX: usize = 16;

/// The name of a stage's Vault ACL policy and Kubernetes-auth role:
/// `<prefix><namespace>-<pipeline>-<stage>-<hash>`, the readable part cut so that the whole name
/// is at most 63 characters (with the default prefix, a DNS label as before).
///
/// The hash is of the exact (namespace, pipeline, stage), each part length-prefixed, so the name
/// is injective: two different triples never share a Vault name, whatever they spell when joined
/// with '-' (`ml` + `fraud-fraud-detector` and `ml-fraud` + `fraud-detector` differ). The
/// readable part is for humans only; nothing parses it.
pub fn vault_object(prefix: &str, namespace: &str, pipeline: &str, stage: &str) -> String {
    let readable: String = [namespace, pipeline, stage]
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(
            MAX_LABEL
                .saturating_sub(prefix.len() + 1 + VAULT_HASH_HEX)
                .max(8),
        )
        .collect();
    let readable = readable.trim_matches('-');
    format!(
        "{prefix}{readable}-{}",
        triple_hash(namespace, pipeline, stage)
    )
}

/// SHA-256 of the length-prefixed triple, as [`VAULT_HASH_HEX`] hex digits.
fn triple_hash(namespace: &str, pipeline: &str, stage: &str) -> String {
    let mut h = Sha256::new();
    for part in [namespace, pipeline, stage] {
        h.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        h.update(part.as_bytes());
    }
    let mut hex = hex::encode(&h.finalize()[..VAULT_HASH_HEX / 2]);
    hex.truncate(VAULT_HASH_HEX);
    hex
}

/// Whether `prefix` can start Vault object names: letters, digits, '-' and '_', at most 32
/// characters, not empty (an empty prefix would let the operator's Vault policy reach every
/// policy).
pub fn check_vault_name_prefix(prefix: &str) -> Result<(), String> {
    let valid = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "--vault-name-prefix {prefix:?} is not usable; use 1 to 32 letters, digits, '-' or '_', such as {DEFAULT_VAULT_NAME_PREFIX:?}"
        ))
    }
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
        let name = vault_object("portcullis-", "ml", "fraud-detector", "ingest");
        assert!(
            name.starts_with("portcullis-ml-fraud-detector-ingest-"),
            "{name}"
        );
        assert_eq!(
            name.len(),
            "portcullis-ml-fraud-detector-ingest-".len() + 16
        );
    }

    #[test]
    fn vault_names_of_triples_that_join_alike_differ() {
        // Class 2 of the escapes: these joined to the same name before.
        assert_ne!(
            vault_object("p-", "ml", "fraud-fraud-detector", "x"),
            vault_object("p-", "ml-fraud", "fraud-detector", "x")
        );
        assert_ne!(
            vault_object("p-", "team", "prod-scorer", "serve"),
            vault_object("p-", "team-prod", "scorer", "serve")
        );
        let long = "a".repeat(200);
        assert_ne!(
            vault_object("p-", "ml", &long, "x"),
            vault_object("p-", "ml", &long, "y")
        );
    }

    #[test]
    fn vault_name_prefixes_are_checked() {
        assert!(check_vault_name_prefix("portcullis-").is_ok());
        assert!(check_vault_name_prefix("").is_err());
        let err = check_vault_name_prefix("a/b").unwrap_err();
        assert!(err.contains("--vault-name-prefix"), "{err}");
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
