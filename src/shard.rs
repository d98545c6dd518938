//! Sharding by namespace: with `--shard-count N`, `portcullis run --shard-index I` reconciles
//! only the AIPipelines (and caches only the objects) of the namespaces that belong to shard
//! `I`. Pure: no I/O.
//!
//! A namespace belongs to shard `h(name) mod N`, where `h(name)` is the first 8 bytes of the
//! SHA-256 digest of the namespace's name (its UTF-8 bytes), read as a big-endian unsigned
//! 64-bit integer. The function is fixed (never a randomized hasher), so every replica of
//! every shard, of every version, agrees on who owns a namespace. Changing it, or the shard
//! count, moves namespaces between shards.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One shard of `count`: the namespaces whose [`bucket`](Shard::bucket) is `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    index: u32,
    count: u32,
}

/// `--shard-index` and `--shard-count` do not make a shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard-count must be at least 1")]
    NoShards,
    #[error(
        "--shard-index {index} is out of range: with --shard-count {count} it must be from 0 to {}",
        count - 1
    )]
    IndexOutOfRange { index: u32, count: u32 },
}

impl Default for Shard {
    fn default() -> Self {
        Shard::ALL
    }
}

impl Shard {
    /// The only shard when there is one: it owns every namespace.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count` (`0 <= index < count`).
    pub fn new(index: u32, count: u32) -> Result<Shard, ShardError> {
        if count == 0 {
            return Err(ShardError::NoShards);
        }
        if index >= count {
            return Err(ShardError::IndexOutOfRange { index, count });
        }
        Ok(Shard { index, count })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// More than one shard.
    pub fn is_sharded(&self) -> bool {
        self.count > 1
    }

    /// The shard (of `count`) that `namespace` belongs to: the first 8 bytes of
    /// SHA-256(`namespace`), big-endian, modulo `count`. `count` must not be 0.
    pub fn bucket(namespace: &str, count: u32) -> u32 {
        let digest = Sha256::digest(namespace.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let bucket = u64::from_be_bytes(first) % u64::from(count.max(1));
        u32::try_from(bucket).expect("a remainder of a division by a u32 fits a u32")
    }

    /// Whether this shard reconciles the AIPipelines of `namespace` (and caches its objects).
    pub fn owns(&self, namespace: &str) -> bool {
        self.count == 1 || Shard::bucket(namespace, self.count) == self.index
    }

    /// `base` for the only shard; `<base>-shard-<index>-of-<count>` otherwise. The leader
    /// Lease and the Vault token Secret are named so: each shard has its own.
    pub fn name(&self, base: &str) -> String {
        if self.is_sharded() {
            format!("{base}-{self}")
        } else {
            base.to_string()
        }
    }

    /// `path` for the only shard; otherwise the same folder and file name with
    /// `-shard-<index>-of-<count>` before the extension (`decisions.log` becomes
    /// `decisions-shard-0-of-2.log`), so that two shards sharing a volume never append to one
    /// decision log.
    pub fn path(&self, path: &Path) -> PathBuf {
        if !self.is_sharded() {
            return path.to_path_buf();
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match path.extension() {
            Some(ext) => format!("{stem}-{self}.{}", ext.to_string_lossy()),
            None => format!("{stem}-{self}"),
        };
        path.with_file_name(name)
    }
}

/// `shard-<index>-of-<count>`.
impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}-of-{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_count_are_checked() {
        assert_eq!(Shard::new(0, 0), Err(ShardError::NoShards));
        assert_eq!(
            Shard::new(2, 2),
            Err(ShardError::IndexOutOfRange { index: 2, count: 2 })
        );
        assert_eq!(
            Shard::new(2, 2).unwrap_err().to_string(),
            "--shard-index 2 is out of range: with --shard-count 2 it must be from 0 to 1"
        );
        assert_eq!(Shard::new(0, 1), Ok(Shard::ALL));
        assert_eq!(Shard::default(), Shard::ALL);
        let s = Shard::new(3, 4).unwrap();
        assert_eq!((s.index(), s.count()), (3, 4));
    }

    #[test]
    fn one_shard_owns_everything() {
        for ns in ["default", "kube-system", "", "team-a"] {
            assert!(Shard::ALL.owns(ns));
        }
    }

    #[test]
    fn every_namespace_has_exactly_one_owner() {
        for count in 1..=8 {
            let shards: Vec<Shard> = (0..count).map(|i| Shard::new(i, count).unwrap()).collect();
            for n in 0..200 {
                let ns = format!("team-{n}");
                let owners: Vec<u32> = shards
                    .iter()
                    .filter(|s| s.owns(&ns))
                    .map(|s| s.index())
                    .collect();
                assert_eq!(owners, vec![Shard::bucket(&ns, count)], "{ns} of {count}");
            }
        }
    }

    /// Fixed values: a change of the hash function (which would move namespaces between the
    /// shards of running operators) fails here.
    #[test]
    fn the_hash_is_stable() {
        // `echo -n default | sha256sum` starts 37a8eec1ce19687d.
        let first8 = |s: &str| {
            let d = Sha256::digest(s.as_bytes());
            u64::from_be_bytes(d[..8].try_into().unwrap())
        };
        assert_eq!(first8("default"), 0x37a8_eec1_ce19_687d);
        let fixed: Vec<(&str, [u32; 4])> = ["default", "kube-system", "team-a", "ml-prod"]
            .iter()
            .map(|ns| (*ns, [2, 3, 5, 8].map(|count| Shard::bucket(ns, count))))
            .collect();
        assert_eq!(
            fixed,
            vec![
                ("default", [1, 1, 4, 5]),
                ("kube-system", [1, 1, 4, 1]),
                ("team-a", [0, 0, 1, 4]),
                ("ml-prod", [0, 0, 3, 6]),
            ]
        );
    }

    #[test]
    fn namespaces_spread_evenly() {
        let names: Vec<String> = (0..4000).map(|n| format!("pipelines-{n:04}")).collect();
        for count in 2..=8u32 {
            let mut per = vec![0usize; count as usize];
            for ns in &names {
                per[Shard::bucket(ns, count) as usize] += 1;
            }
            let expected = names.len() / count as usize;
            for (i, n) in per.iter().enumerate() {
                // Within 15 % of an even share (a binomial's spread here is about 3 %).
                assert!(
                    n.abs_diff(expected) * 100 <= expected * 15,
                    "shard {i} of {count} owns {n} of {} namespaces",
                    names.len()
                );
            }
        }
    }

    #[test]
    fn names_and_paths_per_shard() {
        let s = Shard::new(1, 3).unwrap();
        assert_eq!(s.to_string(), "shard-1-of-3");
        assert_eq!(
            s.name("portcullis-leader"),
            "portcullis-leader-shard-1-of-3"
        );
        assert_eq!(Shard::ALL.name("portcullis-leader"), "portcullis-leader");
        assert_eq!(
            s.path(Path::new("/var/lib/portcullis/decisions.log")),
            Path::new("/var/lib/portcullis/decisions-shard-1-of-3.log")
        );
        assert_eq!(s.path(Path::new("log")), Path::new("log-shard-1-of-3"));
        assert_eq!(
            Shard::ALL.path(Path::new("/var/lib/portcullis/decisions.log")),
            Path::new("/var/lib/portcullis/decisions.log")
        );
    }
}
