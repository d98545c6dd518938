//! Vault's ACL evaluation (`vault/acl.go` in Vault 1.15): the policies of a token merged into
//! exact, prefix and segment-wildcard rules, and the most specific matching rule deciding.
//!
//! - Rules for the same path from several policies are merged: capabilities are unioned, and a
//!   `deny` in any of them leaves only `deny`.
//! - An exact rule for the path wins outright (for a list operation, the path without its trailing
//!   `/` is tried too).
//! - Otherwise the longest matching prefix rule (`foo/*`) and every matching `+` rule compete, and
//!   the highest priority wins: the later first `+`/`*` position; then not a prefix over a prefix;
//!   then fewer `+` segments; then the longer pattern; then the lexicographically greater one.
//! - The winning rule alone decides: a more specific rule without the capability denies even
//!   when a broader rule would allow.
//! - The `root` policy allows everything.

use std::collections::BTreeMap;

use super::hcl::{Policy, caps};

/// A logical operation, as Vault maps HTTP methods onto them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Read,
    List,
    Create,
    Update,
    Delete,
    Patch,
}

impl Operation {
    /// The capability an operation needs.
    pub(crate) fn capability(self) -> u32 {
        match self {
            Operation::Read => caps::READ,
            Operation::List => caps::LIST,
            Operation::Create => caps::CREATE,
            Operation::Update => caps::UPDATE,
            Operation::Delete => caps::DELETE,
            Operation::Patch => caps::PATCH,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::List => "list",
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Patch => "patch",
        }
    }
}

/// The merged rules of a set of policies.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acl {
    root: bool,
    exact: BTreeMap<String, u32>,
    prefix: BTreeMap<String, u32>,
    wildcard: BTreeMap<String, u32>,
}

fn merge(existing: Option<&u32>, new: u32) -> u32 {
    match existing {
        None => new,
        Some(old) if old & caps::DENY != 0 => caps::DENY,
        Some(_) if new & caps::DENY != 0 => caps::DENY,
        Some(old) => old | new,
    }
}

struct Candidate<'a> {
    first_wc_or_glob: usize,
    wildcards: usize,
    is_prefix: bool,
    path: &'a str,
    bits: u32,
}

/// Vault's `less`: whether `a` has lower priority than `b`.
fn lower_priority(a: &Candidate<'_>, b: &Candidate<'_>) -> bool {
    if a.first_wc_or_glob != b.first_wc_or_glob {
        return a.first_wc_or_glob < b.first_wc_or_glob;
    }
    if a.is_prefix != b.is_prefix {
        return a.is_prefix;
    }
    if a.wildcards != b.wildcards {
        return a.wildcards > b.wildcards;
    }
    if a.path.len() != b.path.len() {
        return a.path.len() < b.path.len();
    }
    a.path < b.path
}

impl Acl {
    /// Merges `policies` (named, for the `root` check).
    pub(crate) fn new<'a>(policies: impl IntoIterator<Item = (&'a str, &'a Policy)>) -> Acl {
        let mut acl = Acl::default();
        for (name, policy) in policies {
            if name == "root" {
                acl.root = true;
            }
            for rule in &policy.paths {
                if rule.templated {
                    continue;
                }
                let tree = if rule.has_segment_wildcards {
                    &mut acl.wildcard
                } else if rule.is_prefix {
                    &mut acl.prefix
                } else {
                    &mut acl.exact
                };
                let merged = merge(tree.get(&rule.path), rule.bits);
                tree.insert(rule.path.clone(), merged);
            }
        }
        acl
    }

    /// The ACL of the `root` policy.
    pub(crate) fn root() -> Acl {
        Acl {
            root: true,
            ..Acl::default()
        }
    }

    pub(crate) fn is_root(&self) -> bool {
        self.root
    }

    /// The capability bits of the rule deciding for `path`, `None` when no rule matches.
    pub(crate) fn bits(&self, path: &str, list: bool) -> Option<u32> {
        let path = path.trim_start_matches('/');
        if let Some(bits) = self.exact.get(path) {
            return Some(*bits);
        }
        if list && let Some(bits) = self.exact.get(path.strip_suffix('/').unwrap_or(path)) {
            return Some(*bits);
        }
        self.non_exact(path)
    }

    fn non_exact(&self, path: &str) -> Option<u32> {
        let mut candidates = Vec::new();
        let longest_prefix = self
            .prefix
            .iter()
            .filter(|(p, _)| path.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len());
        if let Some((prefix, bits)) = longest_prefix {
            if self.wildcard.is_empty() {
                return Some(*bits);
            }
            candidates.push(Candidate {
                first_wc_or_glob: prefix.len(),
                wildcards: 0,
                is_prefix: true,
                path: prefix,
                bits: *bits,
            });
        }
        let parts: Vec<&str> = path.split('/').collect();
        'patterns: for (full, bits) in &self.wildcard {
            if full.is_empty() {
                continue;
            }
            let first = full.find('+').unwrap_or(0);
            let (pattern, is_prefix) = match full.strip_suffix('*') {
                Some(p) => (p, true),
                None => (full.as_str(), false),
            };
            let pattern_parts: Vec<&str> = pattern.split('/').collect();
            if parts.len() < pattern_parts.len() {
                continue;
            }
            if !is_prefix && parts.len() != pattern_parts.len() {
                continue;
            }
            let mut wildcards = 0;
            for (i, acl_part) in pattern_parts.iter().enumerate() {
                let last_glob =
                    is_prefix && i == pattern_parts.len() - 1 && parts[i].starts_with(acl_part);
                if *acl_part == "+" {
                    wildcards += 1;
                } else if *acl_part != parts[i] && !last_glob {
                    continue 'patterns;
                }
            }
            candidates.push(Candidate {
                first_wc_or_glob: first,
                wildcards,
                is_prefix,
                path: pattern,
                bits: *bits,
            });
        }
        let mut best: Option<&Candidate<'_>> = None;
        for c in &candidates {
            best = match best {
                Some(b) if !lower_priority(b, c) => Some(b),
                _ => Some(c),
            };
        }
        best.map(|c| c.bits)
    }

    /// Whether `op` on `path` is allowed.
    pub(crate) fn allows(&self, op: Operation, path: &str) -> bool {
        if self.root {
            return true;
        }
        match self.bits(path, op == Operation::List) {
            Some(bits) => bits & caps::DENY == 0 && bits & op.capability() != 0,
            None => false,
        }
    }

    /// Whether the rule deciding for `path` grants `sudo`.
    pub(crate) fn has_sudo(&self, path: &str) -> bool {
        self.root
            || self
                .bits(path, false)
                .is_some_and(|b| b & caps::DENY == 0 && b & caps::SUDO != 0)
    }

    /// What `sys/capabilities-self` answers for `path`: `["root"]`, `["deny"]` or the names.
    pub(crate) fn capabilities(&self, path: &str) -> Vec<String> {
        if self.root {
            return vec!["root".into()];
        }
        let bits = self.bits(path, true).unwrap_or(0);
        if bits & caps::DENY != 0 || bits == 0 {
            return vec!["deny".into()];
        }
        caps::NAMES
            .iter()
            .filter(|(n, b)| *n != "deny" && bits & b != 0)
            .map(|(n, _)| n.to_string())
            .collect()
    }
}
