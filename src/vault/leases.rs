//! When to issue, renew, replace and revoke credential leases. Pure: the controller reads the
//! clock and the cluster, asks [`due`] what to do, and does it.
//!
//! The rules, per requested credential:
//! - no current lease, a changed path or Secret, a missing Secret, a Secret that holds another
//!   lease's credentials (a rotation cut short between saving the new lease and writing the
//!   Secret), or an expired lease: issue new credentials (replacing the current lease, if any);
//! - at its renewal time (about two thirds of the lease, with up to a tenth of jitter): renew, or,
//!   when the lease is not renewable or its last renewal was cut short by Vault's max TTL, issue
//!   new credentials instead;
//! - a replaced lease is revoked once its grace period is over (consumers had time to pick up
//!   the new Secret), and never before the restarts of its consumers are done;
//! - a lease whose credential is no longer requested is revoked now.
//!
//! A lease is never kept longer than the credential's `ttl` (the guardrail's ceiling): when Vault
//! grants more, Portcullis plans its expiry at `ttl` and replaces it before then.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plan::CredentialRequest;

/// One lease the operator holds, as kept in its state Secret (never shown to workloads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    pub stage: String,
    pub credential: String,
    pub path: String,
    pub secret_name: String,
    pub lease_id: String,
    pub issued_at: DateTime<Utc>,
    /// When the lease ends as Portcullis plans it: Vault's expiry, or `ttl` after issue if that
    /// is sooner.
    pub expires_at: DateTime<Utc>,
    pub renew_at: DateTime<Utc>,
    pub renewable: bool,
    /// Seconds Vault granted at issue or at the last renewal.
    #[serde(default)]
    pub granted_seconds: u64,
    /// The last renewal was cut short by the lease's max TTL: replace it next time.
    #[serde(default)]
    pub replace_next: bool,
    /// Replaced by newer credentials: revoked at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<DateTime<Utc>>,
    /// The consumers of the credentials issued with this lease still have to be restarted.
    #[serde(default)]
    pub restart_pending: bool,
    /// The accessor of the operator token that issued it: the lease ends when that token does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_accessor: Option<String>,
    /// Issued under a token the operator no longer holds (its Secret was lost): nobody renews
    /// that token, so the lease ends with it; replace it now.
    #[serde(default)]
    pub orphaned: bool,
    /// A rotation was asked for (the `portcullis.dev/rotate-now` annotation): replace it now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate_requested: bool,
}

impl LeaseRecord {
    pub fn is_current(&self) -> bool {
        self.retire_at.is_none()
    }

    fn is(&self, request: &CredentialRequest) -> bool {
        self.stage == request.stage && self.credential == request.name
    }
}

/// A SHA-256 prefix of a lease id: shown in status, annotations and the decision log instead of
/// the id.
pub fn lease_hash(lease_id: &str) -> String {
    hex::encode(&Sha256::digest(lease_id.as_bytes())[..8])
}

/// When to renew a lease of `duration` that starts at `from`: at two thirds, less a jitter of
/// up to a tenth of the lease that the lease id decides (so renewals of leases issued together
/// spread out, and a restart computes the same time again).
pub fn renew_at(from: DateTime<Utc>, duration: Duration, lease_id: &str) -> DateTime<Utc> {
    let ms = duration.num_milliseconds().max(0);
    let spread = ms / 10;
    let digest = Sha256::digest(lease_id.as_bytes());
    let roll = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    let jitter = if let Ok(spread @ 1..) = u64::try_from(spread) {
        i64::try_from(roll % spread).expect("less than spread, an i64")
    } else {
        0
    };
    from + Duration::milliseconds(ms * 2 / 3 - jitter)
}

/// Whether a call that may take up to `bound` (waiting for a slot, then the call) could run
/// into the next renewal of one of `leases`: a current lease whose renewal is due within
/// `bound`. Work that can wait does not start then. A renewal already overdue (it is failing,
/// and retried anyway) holds nothing up, nor one of a lease whose last stretch (renewal to
/// expiry) is no longer than `bound`: such a lease is always near a renewal, and waiting for
/// it would starve the work for good.
pub fn renewal_near(leases: &[LeaseRecord], now: DateTime<Utc>, bound: Duration) -> bool {
    leases
        .iter()
        .filter(|l| l.is_current())
        .any(|l| now < l.renew_at && l.renew_at <= now + bound && l.expires_at - l.renew_at > bound)
}

/// What a credential's Secret holds, compared with the current lease (its
/// `portcullis.dev/lease-hash` annotation against [`lease_hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The Secret is not there.
    Missing,
    /// It holds the current lease's credentials.
    Current,
    /// It holds other credentials: a replaced lease's, or none the operator knows.
    Stale,
}

/// Something to do for a pipeline's credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Issue credentials for `requests[request]`, replacing the lease `replaces`.
    Issue {
        request: usize,
        replaces: Option<String>,
        why: &'static str,
    },
    /// Renew a lease by the credential's `ttl`.
    Renew { lease_id: String, request: usize },
    /// Revoke a lease.
    Revoke { lease_id: String, why: &'static str },
}

/// What is due at `now`, and when to look again (the earliest future renewal or revocation).
/// `delivery(secret_name, lease_id)` says what a credential's Secret holds.
pub fn due(
    now: DateTime<Utc>,
    requests: &[CredentialRequest],
    leases: &[LeaseRecord],
    delivery: impl Fn(&str, &str) -> Delivery,
) -> (Vec<Step>, Option<DateTime<Utc>>) {
    let mut steps = Vec::new();
    let mut wake: Option<DateTime<Utc>> = None;
    let mut wake_at = |t: DateTime<Utc>| wake = Some(wake.map_or(t, |w| w.min(t)));

    for (i, request) in requests.iter().enumerate() {
        let current = leases.iter().find(|l| l.is_current() && l.is(request));
        let Some(lease) = current else {
            steps.push(Step::Issue {
                request: i,
                replaces: None,
                why: "no credentials issued yet",
            });
            continue;
        };
        let replace = |why| Step::Issue {
            request: i,
            replaces: Some(lease.lease_id.clone()),
            why,
        };
        let delivered = delivery(&request.secret_name, &lease.lease_id);
        if lease.path != request.path || lease.secret_name != request.secret_name {
            steps.push(replace("the credential's path or Secret changed"));
        } else if delivered == Delivery::Missing {
            steps.push(replace("its Secret is missing"));
        } else if delivered == Delivery::Stale {
            steps.push(replace(
                "its Secret holds other credentials than the current lease's",
            ));
        } else if lease.expires_at <= now {
            steps.push(replace("the lease expired"));
        } else if lease.orphaned {
            steps.push(replace(
                "the token that issued it is no longer the operator's, and ends unrenewed",
            ));
        } else if lease.rotate_requested {
            steps.push(replace(
                "a rotation was asked for with the portcullis.dev/rotate-now annotation",
            ));
        } else if lease.renew_at <= now {
            if lease.renewable && !lease.replace_next {
                steps.push(Step::Renew {
                    lease_id: lease.lease_id.clone(),
                    request: i,
                });
            } else if lease.renewable {
                steps.push(replace("the lease is near its max TTL"));
            } else {
                steps.push(replace("the lease is not renewable"));
            }
        } else {
            wake_at(lease.renew_at);
        }
    }

    for lease in leases {
        match lease.retire_at {
            Some(at) => {
                // Consumers still on the old credentials keep them until they are restarted.
                let restarting = leases.iter().any(|l| {
                    l.is_current()
                        && l.restart_pending
                        && l.stage == lease.stage
                        && l.credential == lease.credential
                });
                if (at <= now && !restarting) || lease.expires_at <= now {
                    steps.push(Step::Revoke {
                        lease_id: lease.lease_id.clone(),
                        why: "replaced by new credentials; its grace period is over",
                    });
                } else {
                    wake_at(at.max(now + Duration::seconds(1)).min(lease.expires_at));
                }
            }
            None if !requests.iter().any(|r| lease.is(r)) => steps.push(Step::Revoke {
                lease_id: lease.lease_id.clone(),
                why: "the credential is no longer requested",
            }),
            None => {}
        }
    }
    (steps, wake)
}

/// Whether a renewal that granted `granted` seconds, asking for `ttl`, was cut short by the
/// lease's max TTL: it got less than asked and less than last time, so the lease is nearing its
/// end and should be replaced now, while it still has time for its consumers' grace period.
pub fn cut_short(granted: u64, asked: u64, previous: u64) -> bool {
    granted < asked && granted < previous
}

/// `n` seconds as a duration, saturating: a lease duration Vault sends, however large, never
/// overflows the arithmetic on it.
pub fn seconds(n: u64) -> Duration {
    Duration::try_seconds(i64::try_from(n).unwrap_or(i64::MAX)).unwrap_or(Duration::MAX)
}

/// The lease's planned end: Vault's expiry, capped at `ttl` after `from`.
pub fn planned_expiry(from: DateTime<Utc>, granted: Duration, ttl: Duration) -> DateTime<Utc> {
    from + granted.min(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::CredentialRequest;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("valid time")
    }

    fn request(name: &str) -> CredentialRequest {
        CredentialRequest {
            stage: "train".into(),
            name: name.into(),
            path: "database/creds/train".into(),
            ttl: 900,
            secret_name: format!("{name}-secret"),
            restart_targets: Vec::new(),
        }
    }

    fn lease(name: &str, id: &str) -> LeaseRecord {
        LeaseRecord {
            stage: "train".into(),
            credential: name.into(),
            path: "database/creds/train".into(),
            secret_name: format!("{name}-secret"),
            lease_id: id.into(),
            issued_at: t(0),
            expires_at: t(900),
            renew_at: t(600),
            renewable: true,
            granted_seconds: 900,
            replace_next: false,
            retire_at: None,
            restart_pending: false,
            token_accessor: None,
            orphaned: false,
            rotate_requested: false,
        }
    }

    #[test]
    fn work_that_can_wait_yields_only_to_an_upcoming_renewal_it_could_delay() {
        let bound = Duration::seconds(20);
        // Renewal at 600 s, expiry at 900 s.
        let leases = [lease("db", "a")];
        assert!(!renewal_near(&leases, t(500), bound), "far off");
        assert!(renewal_near(&leases, t(580), bound), "within the bound");
        assert!(renewal_near(&leases, t(599), bound));
        assert!(!renewal_near(&leases, t(600), bound), "due now: overdue");
        assert!(!renewal_near(&leases, t(700), bound), "overdue, failing");
        // A retired lease is not renewed.
        let mut retired = lease("db", "a");
        retired.retire_at = Some(t(650));
        assert!(!renewal_near(&[retired], t(590), bound));
        // A lease whose last stretch is no longer than the bound never holds work up.
        let mut short = lease("db", "a");
        short.expires_at = t(615);
        assert!(!renewal_near(&[short], t(590), bound));
    }

    proptest::proptest! {
        /// Work that yields to a renewal waits at most the bound (the renewal is due within
        /// it, not overdue); it never yields to a lease with no time for it at all (which would
        /// starve it); and it always yields when a renewal it could delay is near.
        #[test]
        fn a_wait_for_a_renewal_is_bounded_and_never_starves_the_work(
            renew in 0i64..2_000, stretch in 0i64..1_000, now in 0i64..3_000, bound in 1i64..120,
        ) {
            let mut l = lease("db", "a");
            l.renew_at = t(renew);
            l.expires_at = t(renew + stretch);
            let near = renewal_near(&[l], t(now), Duration::seconds(bound));
            let due_in = renew - now;
            if near {
                proptest::prop_assert!(0 < due_in && due_in <= bound, "waits {due_in}s");
            }
            if stretch <= bound {
                proptest::prop_assert!(!near, "no time for the work: it must not wait");
            }
            if 0 < due_in && due_in <= bound && stretch > bound {
                proptest::prop_assert!(near, "a renewal it could delay is {due_in}s away");
            }
        }
    }

    #[test]
    fn renewal_falls_between_a_little_over_half_and_two_thirds_and_is_stable() {
        for i in 0..200 {
            let id = format!("database/creds/train/{i}");
            let at = renew_at(t(0), Duration::seconds(900), &id);
            assert!(at <= t(600) && at > t(509), "{at}");
            assert_eq!(at, renew_at(t(0), Duration::seconds(900), &id));
        }
        let spread: std::collections::BTreeSet<_> = (0..50)
            .map(|i| renew_at(t(0), Duration::seconds(900), &i.to_string()))
            .collect();
        assert!(spread.len() > 40, "renewals must spread out: {spread:?}");
    }

    #[test]
    fn a_new_credential_is_issued_and_a_healthy_lease_waits() {
        let (steps, wake) = due(t(10), &[request("db")], &[], |_, _| Delivery::Current);
        assert!(matches!(steps[..], [Step::Issue { replaces: None, .. }]));
        assert_eq!(wake, None);
        let (steps, wake) = due(t(10), &[request("db")], &[lease("db", "L1")], |_, _| {
            Delivery::Current
        });
        assert!(steps.is_empty());
        assert_eq!(wake, Some(t(600)));
    }

    #[test]
    fn renewal_time_renews_unless_the_lease_cannot_go_on() {
        let (steps, _) = due(t(600), &[request("db")], &[lease("db", "L1")], |_, _| {
            Delivery::Current
        });
        assert_eq!(
            steps,
            vec![Step::Renew {
                lease_id: "L1".into(),
                request: 0
            }]
        );
        let mut capped = lease("db", "L1");
        capped.replace_next = true;
        let (steps, _) = due(t(600), &[request("db")], &[capped], |_, _| {
            Delivery::Current
        });
        assert!(
            matches!(&steps[..], [Step::Issue { replaces: Some(id), why, .. }] if id == "L1" && why.contains("max TTL"))
        );
        let mut fixed = lease("db", "L1");
        fixed.renewable = false;
        let (steps, _) = due(t(600), &[request("db")], &[fixed], |_, _| Delivery::Current);
        assert!(matches!(&steps[..], [Step::Issue { why, .. }] if why.contains("not renewable")));
        // Issued under a token the operator lost: replaced long before its renewal is due.
        let mut orphaned = lease("db", "L1");
        orphaned.orphaned = true;
        let (steps, _) = due(t(10), &[request("db")], &[orphaned], |_, _| {
            Delivery::Current
        });
        assert!(
            matches!(&steps[..], [Step::Issue { replaces: Some(id), why, .. }] if id == "L1" && why.contains("no longer the operator's"))
        );
    }

    #[test]
    fn a_missing_secret_or_changed_path_gets_new_credentials() {
        let (steps, _) = due(t(10), &[request("db")], &[lease("db", "L1")], |_, _| {
            Delivery::Missing
        });
        assert!(matches!(&steps[..], [Step::Issue { why, .. }] if why.contains("missing")));
        // A Secret that holds another lease's credentials is as good as missing: the current
        // lease's credentials were never delivered, so new ones replace it.
        let (steps, _) = due(t(10), &[request("db")], &[lease("db", "L1")], |_, _| {
            Delivery::Stale
        });
        assert!(
            matches!(&steps[..], [Step::Issue { replaces: Some(id), why, .. }] if id == "L1" && why.contains("other credentials"))
        );
        let mut moved = request("db");
        moved.path = "database/creds/other".into();
        let (steps, _) = due(t(10), &[moved], &[lease("db", "L1")], |_, _| {
            Delivery::Current
        });
        assert!(matches!(&steps[..], [Step::Issue { why, .. }] if why.contains("changed")));
    }

    #[test]
    fn replaced_leases_wait_for_grace_and_restarts_then_are_revoked() {
        let mut old = lease("db", "OLD");
        old.retire_at = Some(t(120));
        let mut new = lease("db", "NEW");
        new.restart_pending = true;
        let (steps, wake) = due(
            t(130),
            &[request("db")],
            &[old.clone(), new.clone()],
            |_, _| Delivery::Current,
        );
        assert!(steps.is_empty(), "{steps:?}");
        assert_eq!(wake, Some(t(131)));
        new.restart_pending = false;
        let (steps, _) = due(t(130), &[request("db")], &[old.clone(), new], |_, _| {
            Delivery::Current
        });
        assert_eq!(
            steps,
            vec![Step::Revoke {
                lease_id: "OLD".into(),
                why: "replaced by new credentials; its grace period is over"
            }]
        );
    }

    #[test]
    fn a_requested_rotation_replaces_a_lease_that_is_not_due_and_says_why() {
        let mut l = lease("db", "L1");
        let (steps, _) = due(t(10), &[request("db")], std::slice::from_ref(&l), |_, _| {
            Delivery::Current
        });
        assert!(steps.is_empty(), "{steps:?}");
        l.rotate_requested = true;
        let (steps, _) = due(t(10), &[request("db")], &[l], |_, _| Delivery::Current);
        assert_eq!(
            steps,
            vec![Step::Issue {
                request: 0,
                replaces: Some("L1".into()),
                why: "a rotation was asked for with the portcullis.dev/rotate-now annotation"
            }]
        );
    }

    #[test]
    fn a_lease_nobody_requests_is_revoked() {
        let (steps, _) = due(t(10), &[], &[lease("db", "L1")], |_, _| Delivery::Current);
        assert!(matches!(&steps[..], [Step::Revoke { lease_id, .. }] if lease_id == "L1"));
    }

    #[test]
    fn a_renewal_is_cut_short_only_when_it_shrinks() {
        // The engine's default is shorter than the ttl asked: full renewals are not cut short.
        assert!(!cut_short(10, 3600, 6));
        assert!(!cut_short(900, 900, 900));
        // Near the max TTL the grant shrinks.
        assert!(cut_short(3, 3600, 10));
        assert!(cut_short(2, 6, 6));
    }

    #[test]
    fn expiry_is_capped_at_the_credential_ttl() {
        assert_eq!(
            planned_expiry(t(0), Duration::hours(24), Duration::seconds(900)),
            t(900)
        );
        assert_eq!(
            planned_expiry(t(0), Duration::seconds(60), Duration::seconds(900)),
            t(60)
        );
    }
}
