//! The regular expressions the CRD schemas enforce. `super::validate` checks the same rules in
//! Rust (with messages that say how to fix the value), and a test keeps the two in agreement.

/// A DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric.
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: labels joined by '.'.
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An API group: "" (core), a DNS subdomain, or `*` (which the policy then denies).
pub const API_GROUP: &str =
    r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$";
/// A resource, optionally with a subresource; `*` parts are accepted so the policy can deny them.
pub const RESOURCE: &str =
    r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)(/(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?))?$";
/// A verb; `*` is accepted so the policy can deny it.
pub const VERB: &str = r"^(\*|[a-z]+)$";
/// An IPv4 or IPv6 CIDR, roughly; the exact check is done when it is parsed.
pub const CIDR: &str =
    r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/[0-9]{1,3})$";
/// A duration in hours, minutes and seconds, such as `1h30m` or `900s`.
pub const DURATION: &str = r"^([0-9]+(h|m|s))+$";
/// A Vault ACL path: letters, digits and `-_.@=:,~+/`, no leading '/', `*` only at the end.
/// Quotes, backslashes and braces are refused: the path is written into an HCL policy.
pub const VAULT_POLICY_PATH: &str = r"^[A-Za-z0-9_.@=:,~+-][A-Za-z0-9_.@=:,~+/-]*\*?$";
/// A concrete Vault path (no globs), such as `database/creds/reader`.
pub const VAULT_SECRET_PATH: &str = r"^[A-Za-z0-9_.@=:,~-][A-Za-z0-9_.@=:,~/-]*$";
/// A guardrail's Vault path pattern: a Vault ACL path that may hold `{namespace}`, `{pipeline}`
/// and `{stage}`.
pub const VAULT_PATH_PATTERN: &str = r"^([A-Za-z0-9_.@=:,~+-]|\{(namespace|pipeline|stage)\})([A-Za-z0-9_.@=:,~+/-]|\{(namespace|pipeline|stage)\})*\*?$";
/// A namespace name, or `{namespace}` for the pipeline's own.
pub const NAMESPACE_PATTERN: &str = r"^(\{namespace\}|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$";
