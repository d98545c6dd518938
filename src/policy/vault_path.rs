//! Vault ACL path globs: `+` stands for exactly one path segment, a trailing `*` for any suffix
//! (as a string prefix, so it may span segments). See Vault's policy syntax.

/// Whether every path matched by `specific` is also matched by `general`.
///
/// Both are Vault ACL paths. A concrete path (no globs) is covered when `general` matches it.
pub fn covers(general: &str, specific: &str) -> bool {
    let (g_body, g_star) = split_star(general);
    let (s_body, s_star) = split_star(specific);
    let g: Vec<&str> = g_body.split('/').collect();
    let s: Vec<&str> = s_body.split('/').collect();
    for (i, gseg) in g.iter().enumerate() {
        let last = i + 1 == g.len();
        let Some(sseg) = s.get(i) else {
            // `specific` ran out of segments first: it can only still match longer paths when it
            // ends in `*`, and those need not match the rest of `general`.
            return false;
        };
        let s_last = i + 1 == s.len();
        if last && g_star {
            // `general` matches anything that starts with its body from here on.
            if *sseg == "+" {
                return gseg.is_empty();
            }
            return sseg.starts_with(gseg);
        }
        if s_last && s_star {
            // `specific` goes on past this segment in ways a fixed `general` cannot follow.
            return false;
        }
        match (*gseg, *sseg) {
            ("+", "") => return false,
            ("+", _) => {}
            (_, "+") => return false,
            (a, b) if a == b => {}
            _ => return false,
        }
    }
    // Same number of segments and all matched; `specific` must not reach further than `general`.
    s.len() == g.len() && !s_star
}

/// Whether the glob `pattern` matches the concrete path `path`.
pub fn matches(pattern: &str, path: &str) -> bool {
    covers(pattern, path)
}

fn split_star(path: &str) -> (&str, bool) {
    match path.strip_suffix('*') {
        Some(body) => (body, true),
        None => (path, false),
    }
}

/// The mount a path starts with (its first segment), or None when the first segment holds a glob.
pub fn mount(path: &str) -> Option<&str> {
    let first = path.split('/').next().unwrap_or("");
    let is_glob = first == "+" || path.len() == first.len() && path.ends_with('*');
    (!is_glob && !first.is_empty()).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concrete_paths_are_matched_by_globs() {
        assert!(matches("kv/data/ml/*", "kv/data/ml/ingest/db"));
        assert!(matches("kv/data/ml/*", "kv/data/ml/"));
        assert!(!matches("kv/data/ml/*", "kv/data/ml"));
        assert!(matches("kv/data/+/config", "kv/data/team/config"));
        assert!(!matches("kv/data/+/config", "kv/data/a/b/config"));
        assert!(matches("kv/data/ml*", "kv/data/ml-fraud/x"));
        assert!(matches("database/creds/reader", "database/creds/reader"));
        assert!(!matches("database/creds/reader", "database/creds/reader2"));
    }

    #[test]
    fn globs_cover_narrower_globs_only() {
        assert!(covers("kv/data/ml/*", "kv/data/ml/ingest/*"));
        assert!(covers("kv/data/ml/*", "kv/data/ml/+/x"));
        assert!(covers("kv/data/+/*", "kv/data/ml/*"));
        assert!(covers("kv/*", "kv/data/+/config"));
        assert!(!covers("kv/data/ml/ingest/*", "kv/data/ml/*"));
        assert!(!covers("kv/data/ml/x", "kv/data/ml/*"));
        assert!(!covers("kv/data/ml/+", "kv/data/ml/*"));
        assert!(!covers("kv/data/ml/team", "kv/data/ml/+"));
        assert!(!covers("kv/data/ml-*", "kv/data/+/x"));
        assert!(covers("kv/data/ml-*", "kv/data/ml-fraud*"));
        assert!(!covers("kv/data/ml-fraud*", "kv/data/ml-*"));
    }

    #[test]
    fn mount_is_the_first_literal_segment() {
        assert_eq!(mount("kv/data/x"), Some("kv"));
        assert_eq!(mount("sys/policies/acl"), Some("sys"));
        assert_eq!(mount("+/data"), None);
        assert_eq!(mount("k*"), None);
    }
}
