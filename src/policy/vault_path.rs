//! Vault ACL path globs: `+` stands for exactly one path segment, a trailing `*` for any suffix
//! (as a string prefix, so it may span segments). See Vault's policy syntax.

/// Whether every path matched by `specific` is also matched by `general`.
///
/// Both are Vault ACL paths. A concrete path (no globs) is covered when `general` matches it.
pub(crate) fn covers(general: &str, specific: &str) -> bool {
    let (g_body, g_star) = split_star(general);
    let (s_body, s_star) = split_star(specific);
    let mut g = g_body.split('/').peekable();
    let mut s = s_body.split('/').peekable();
    while let Some(gseg) = g.next() {
        let last = g.peek().is_none();
        let Some(sseg) = s.next() else {
            // `specific` ran out of segments first: it can only still match longer paths when it
            // ends in `*`, and those need not match the rest of `general`.
            return false;
        };
        let s_last = s.peek().is_none();
        if last && g_star {
            // `general` matches anything that starts with its body from here on.
            if sseg == "+" {
                return gseg.is_empty();
            }
            return sseg.starts_with(gseg);
        }
        if s_last && s_star {
            // `specific` goes on past this segment in ways a fixed `general` cannot follow.
            return false;
        }
        match (gseg, sseg) {
            ("+", "") => return false,
            ("+", _) => {}
            (_, "+") => return false,
            (a, b) if a == b => {}
            _ => return false,
        }
    }
    // Same number of segments and all matched; `specific` must not reach further than `general`.
    s.next().is_none() && !s_star
}

/// Whether the glob `pattern` matches the concrete path `path`.
pub(crate) fn matches(pattern: &str, path: &str) -> bool {
    covers(pattern, path)
}

fn split_star(path: &str) -> (&str, bool) {
    match path.strip_suffix('*') {
        Some(body) => (body, true),
        None => (path, false),
    }
}

/// The mount a path starts with (its first segment), or None when the first segment holds a glob.
pub(crate) fn mount(path: &str) -> Option<&str> {
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

    /// `covers` as it was written first, with the segments collected into vectors.
    fn covers_by_vectors(general: &str, specific: &str) -> bool {
        let (g_body, g_star) = split_star(general);
        let (s_body, s_star) = split_star(specific);
        let g: Vec<&str> = g_body.split('/').collect();
        let s: Vec<&str> = s_body.split('/').collect();
        for (i, gseg) in g.iter().enumerate() {
            let last = i + 1 == g.len();
            let Some(sseg) = s.get(i) else {
                return false;
            };
            let s_last = i + 1 == s.len();
            if last && g_star {
                if *sseg == "+" {
                    return gseg.is_empty();
                }
                return sseg.starts_with(gseg);
            }
            if s_last && s_star {
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
        s.len() == g.len() && !s_star
    }

    #[test]
    fn covers_agrees_with_the_first_version() {
        let segments = ["", "kv", "data", "+", "ml", "ml-", "x"];
        let mut paths = vec![String::new(), "*".to_string()];
        for a in segments {
            for b in segments {
                for c in ["", "x", "+"] {
                    for star in ["", "*"] {
                        paths.push(format!("{a}{star}"));
                        paths.push(format!("{a}/{b}{star}"));
                        paths.push(format!("{a}/{b}/{c}{star}"));
                    }
                }
            }
        }
        for g in &paths {
            for s in &paths {
                assert_eq!(covers(g, s), covers_by_vectors(g, s), "{g:?} covers {s:?}");
            }
        }
    }

    #[test]
    fn mount_is_the_first_literal_segment() {
        assert_eq!(mount("kv/data/x"), Some("kv"));
        assert_eq!(mount("sys/policies/acl"), Some("sys"));
        assert_eq!(mount("+/data"), None);
        assert_eq!(mount("k*"), None);
    }
}
