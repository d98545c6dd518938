use super::*;
use crate::access::Grant;

fn stage() -> Arc<StageInfo> {
    let grant = |verb: &str, resource: &str, names: &[&str]| Grant {
        source: Source::Kubernetes,
        api_group: String::new(),
        resource: resource.into(),
        verb: verb.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        text: if names.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{}", names.join(","))
        },
    };
    Arc::new(StageInfo {
        namespace: "ml".into(),
        pipeline: "fraud".into(),
        pipeline_uid: "uid-1".into(),
        stage: "ingest".into(),
        user: "system:serviceaccount:ml:fraud-ingest".into(),
        service_account: "fraud-ingest".into(),
        grants: vec![
            grant("get", "configmaps", &["cfg"]),
            grant("list", "pods", &[]),
            grant("get", "secrets", &["db"]),
        ],
        seed: Vec::new(),
        seed_since: None,
    })
}

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

fn req(verb: &str, resource: &str, name: Option<&str>, verdict: Verdict, at: i64) -> Observation {
    Observation {
        source: Source::Kubernetes,
        user: "system:serviceaccount:ml:fraud-ingest".into(),
        verb: verb.into(),
        api_group: String::new(),
        resource: resource.into(),
        subresource: None,
        name: name.map(str::to_string),
        namespace: Some("ml".into()),
        verdict,
        source_ip: Some("10.0.0.5".into()),
        user_agent: Some("python-requests".into()),
        time: t(at),
    }
}

fn records(out: &[Output]) -> Vec<&Entry> {
    out.iter()
        .filter_map(|o| match o {
            Output::Record(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn anomalies(out: &[Output]) -> Vec<(AnomalyKind, &str)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Anomaly(a, _) => Some((a.kind, a.message.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn identical_requests_in_a_window_become_one_count_record() {
    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    for i in 0..500 {
        tracker.observe(
            stage(),
            req("get", "configmaps", Some("cfg"), Verdict::Allow, i % 50),
            PodIps::Unknown,
            &mut out,
        );
    }
    tracker.observe(
        stage(),
        req("list", "pods", None, Verdict::Allow, 10),
        PodIps::Unknown,
        &mut out,
    );
    assert!(
        records(&out).is_empty(),
        "allowed requests wait for the window's end"
    );
    tracker.flush(t(60), &mut out);
    let recs = records(&out);
    assert_eq!(recs.len(), 2);
    let cfg = recs
        .iter()
        .find(|e| e.object.as_deref() == Some("get configmaps/cfg"))
        .unwrap();
    assert_eq!(cfg.action, Action::Access);
    assert_eq!(cfg.verdict.as_deref(), Some("Allow"));
    let item = cfg.item.as_ref().unwrap();
    assert_eq!(item["count"], 500);
    assert_eq!(item["firstTime"], format_time(t(0)));
    assert_eq!(item["lastTime"], format_time(t(49)));
    assert_eq!(item["grant"], "get configmaps/cfg");
    assert_eq!(item["sourceCheck"], "pod-ips-unknown");
}

#[test]
fn refusals_are_recorded_one_by_one_up_to_the_rate_then_counted() {
    let thresholds = Thresholds {
        deny_records_per_minute: 5,
        ..Thresholds::default()
    };
    let mut tracker = Tracker::new(thresholds);
    let mut out = Vec::new();
    for _ in 0..12 {
        tracker.observe(
            stage(),
            req("list", "secrets", None, Verdict::Deny, 1),
            PodIps::Unknown,
            &mut out,
        );
    }
    let individual: Vec<_> = records(&out)
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Refused"))
        .collect();
    assert_eq!(individual.len(), 5);
    // One AccessDenied per request and window, not twelve.
    let denied = anomalies(&out);
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].0, AnomalyKind::AccessDenied);
    assert!(denied[0].1.contains("list secrets"), "{}", denied[0].1);
    assert!(
        denied[0]
            .1
            .contains("the closest grant is `get secrets/db`"),
        "{}",
        denied[0].1
    );
    assert!(
        denied[0].1.contains("resources: [secrets], verbs: [list]"),
        "{}",
        denied[0].1
    );
    out.clear();
    tracker.flush(t(60), &mut out);
    let folded = records(&out);
    assert_eq!(folded.len(), 1);
    assert_eq!(folded[0].reason.as_deref(), Some("RefusedOverRate"));
    assert_eq!(folded[0].item.as_ref().unwrap()["count"], 7);
    // The rate refills: a minute later, refusals are recorded one by one again.
    out.clear();
    tracker.observe(
        stage(),
        req("list", "secrets", None, Verdict::Deny, 61),
        PodIps::Unknown,
        &mut out,
    );
    assert_eq!(records(&out).len(), 1);
    assert_eq!(anomalies(&out).len(), 1, "a new window alerts again");
}

#[test]
fn a_token_used_from_outside_the_stage_pods_is_an_anomaly_and_unknown_addresses_are_said_so() {
    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    let pods = vec!["10.0.0.5".to_string()];
    tracker.observe(
        stage(),
        req("list", "pods", None, Verdict::Allow, 1),
        PodIps::Known(&pods),
        &mut out,
    );
    assert!(anomalies(&out).is_empty());
    let mut outside = req("list", "pods", None, Verdict::Allow, 2);
    outside.source_ip = Some("203.0.113.9".into());
    tracker.observe(stage(), outside.clone(), PodIps::Known(&pods), &mut out);
    tracker.observe(stage(), outside, PodIps::Known(&pods), &mut out);
    let found = anomalies(&out);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, AnomalyKind::TokenUsedOutsidePods);
    assert!(found[0].1.contains("203.0.113.9"));
    let mut elsewhere = req("get", "configmaps", Some("cfg"), Verdict::Allow, 3);
    elsewhere.source_ip = Some("203.0.113.10".into());
    tracker.observe(stage(), elsewhere, PodIps::Unknown, &mut out);
    assert_eq!(
        anomalies(&out).len(),
        1,
        "not checked without pod addresses"
    );
    out.clear();
    tracker.flush(t(60), &mut out);
    let cfg = records(&out)
        .into_iter()
        .find(|e| e.object.as_deref() == Some("get configmaps/cfg"))
        .unwrap();
    assert_eq!(cfg.item.as_ref().unwrap()["sourceCheck"], "pod-ips-unknown");
}

#[test]
fn a_permission_first_used_after_the_learning_window_is_new_behaviour() {
    let thresholds = Thresholds {
        learning_window: Duration::from_secs(3600),
        ..Thresholds::default()
    };
    let mut tracker = Tracker::new(thresholds);
    let mut out = Vec::new();
    tracker.observe(
        stage(),
        req("list", "pods", None, Verdict::Allow, 0),
        PodIps::Unknown,
        &mut out,
    );
    tracker.observe(
        stage(),
        req("list", "pods", None, Verdict::Allow, 7200),
        PodIps::Unknown,
        &mut out,
    );
    assert!(
        anomalies(&out).is_empty(),
        "used during the learning window"
    );
    tracker.observe(
        stage(),
        req("get", "secrets", Some("db"), Verdict::Allow, 7300),
        PodIps::Unknown,
        &mut out,
    );
    let found = anomalies(&out);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, AnomalyKind::NewBehaviour);
    assert!(found[0].1.contains("get secrets/db"), "{}", found[0].1);
    tracker.observe(
        stage(),
        req("get", "secrets", Some("db"), Verdict::Allow, 7400),
        PodIps::Unknown,
        &mut out,
    );
    assert_eq!(anomalies(&out).len(), 1, "only the first use is new");
}

#[test]
fn a_window_far_above_the_baseline_is_a_volume_spike() {
    let thresholds = Thresholds {
        baseline_windows: 3,
        spike_min_requests: 100,
        spike_factor: 10.0,
        ..Thresholds::default()
    };
    let mut tracker = Tracker::new(thresholds);
    let mut out = Vec::new();
    for w in 0..4 {
        for i in 0..20 {
            tracker.observe(
                stage(),
                req("list", "pods", None, Verdict::Allow, w * 60 + i),
                PodIps::Unknown,
                &mut out,
            );
        }
        tracker.flush(t(w * 60 + 60), &mut out);
    }
    assert!(anomalies(&out).is_empty(), "steady traffic");
    // Twice the baseline is no spike; 20 times is.
    for i in 0..40 {
        tracker.observe(
            stage(),
            req("list", "pods", None, Verdict::Allow, 240 + i % 60),
            PodIps::Unknown,
            &mut out,
        );
    }
    tracker.flush(t(300), &mut out);
    assert!(anomalies(&out).is_empty());
    for i in 0..400 {
        tracker.observe(
            stage(),
            req("list", "pods", None, Verdict::Allow, 300 + i % 60),
            PodIps::Unknown,
            &mut out,
        );
    }
    tracker.flush(t(360), &mut out);
    let found = anomalies(&out);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, AnomalyKind::VolumeSpike);
    assert!(found[0].1.contains("400 requests"), "{}", found[0].1);
}

#[test]
fn usage_counts_each_grant_and_names_the_unused() {
    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    tracker.observe(
        stage(),
        req("get", "configmaps", Some("cfg"), Verdict::Allow, 5),
        PodIps::Unknown,
        &mut out,
    );
    tracker.observe(
        stage(),
        req("get", "configmaps", Some("cfg"), Verdict::Allow, 9),
        PodIps::Unknown,
        &mut out,
    );
    // Not covered: another name, and another namespace.
    tracker.observe(
        stage(),
        req("get", "configmaps", Some("other"), Verdict::Allow, 9),
        PodIps::Unknown,
        &mut out,
    );
    let mut elsewhere = req("list", "pods", None, Verdict::Allow, 9);
    elsewhere.namespace = Some("kube-system".into());
    tracker.observe(stage(), elsewhere, PodIps::Unknown, &mut out);
    tracker.flush(t(60), &mut out);
    let usage = out
        .iter()
        .find_map(|o| match o {
            Output::Usage(u) => Some(u.usage.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(usage.len(), 3);
    assert_eq!(
        (usage[0].grant.as_str(), usage[0].used, usage[0].count),
        ("get configmaps/cfg", true, 2)
    );
    assert_eq!(
        usage[0].last_used.as_deref(),
        Some(format_time(t(9)).as_str())
    );
    assert!(!usage[1].used && !usage[2].used);
    // Nothing changed: no update.
    out.clear();
    tracker.flush(t(120), &mut out);
    assert!(!out.iter().any(|o| matches!(o, Output::Usage(_))));
}

#[test]
fn a_hostile_user_agent_does_not_make_records_large() {
    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    let mut obs = req("list", "secrets", None, Verdict::Deny, 1);
    obs.user_agent = Some("x".repeat(1_000_000));
    tracker.observe(stage(), obs, PodIps::Unknown, &mut out);
    for o in &out {
        let entry = match o {
            Output::Record(e) | Output::Anomaly(_, e) => e,
            Output::Usage(_) => continue,
        };
        let size = entry.message.len() + entry.item.as_ref().map_or(0, |i| i.to_string().len());
        assert!(size < 4096, "{size} bytes");
    }
}

/// The stage as the directory has it after a restart: its status showed `seed` since `since`.
fn restarted(seed: &[(&str, u64)], since: i64) -> Arc<StageInfo> {
    let mut info = (*stage()).clone();
    info.seed = seed
        .iter()
        .map(|(grant, count)| GrantUsage {
            grant: (*grant).into(),
            used: *count > 0,
            count: *count,
            last_used: (*count > 0).then(|| format_time(t(since + 10))),
        })
        .collect();
    info.seed_since = Some(t(since));
    Arc::new(info)
}

#[test]
fn after_a_restart_the_learning_window_keeps_its_start_and_used_grants_are_not_new() {
    let thresholds = Thresholds {
        learning_window: Duration::from_secs(3600),
        ..Thresholds::default()
    };
    // Before the restart: `get configmaps/cfg` used, first seen at 0.
    let info = restarted(&[("get configmaps/cfg", 5), ("list pods", 0)], 0);
    let mut tracker = Tracker::new(thresholds.clone());
    let mut out = Vec::new();
    tracker.observe(
        info.clone(),
        req("get", "configmaps", Some("cfg"), Verdict::Allow, 7200),
        PodIps::Unknown,
        &mut out,
    );
    assert!(
        anomalies(&out).is_empty(),
        "used before the restart: not new"
    );
    tracker.observe(
        info.clone(),
        req("list", "pods", None, Verdict::Allow, 7201),
        PodIps::Unknown,
        &mut out,
    );
    let found = anomalies(&out);
    assert_eq!(found.len(), 1, "the learning window did not start over");
    assert_eq!(found[0].0, AnomalyKind::NewBehaviour);
    assert!(found[0].1.contains("list pods"), "{}", found[0].1);

    // Counts continue, and `usageSince` stays.
    out.clear();
    tracker.flush(t(7260), &mut out);
    let update = out
        .iter()
        .find_map(|o| match o {
            Output::Usage(u) => Some(u.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(update.usage[0].count, 6);
    assert_eq!(update.since, t(0));

    // Without the persisted state, the same requests would have been learnt afresh.
    let mut fresh = Tracker::new(thresholds);
    let mut out = Vec::new();
    fresh.observe(
        stage(),
        req("list", "pods", None, Verdict::Allow, 7201),
        PodIps::Unknown,
        &mut out,
    );
    assert!(anomalies(&out).is_empty());
}

#[test]
fn after_a_restart_the_volume_baseline_is_the_average_so_far() {
    let thresholds = Thresholds {
        baseline_windows: 5,
        spike_min_requests: 50,
        spike_factor: 10.0,
        ..Thresholds::default()
    };
    // 150 requests in the first window after the restart.
    let burst = |info: Arc<StageInfo>| {
        let mut tracker = Tracker::new(thresholds.clone());
        let mut out = Vec::new();
        for i in 0..150 {
            tracker.observe(
                info.clone(),
                req("list", "pods", None, Verdict::Allow, i % 60),
                PodIps::Unknown,
                &mut out,
            );
        }
        tracker.flush(t(60), &mut out);
        anomalies(&out)
            .into_iter()
            .map(|(kind, _)| kind)
            .collect::<Vec<_>>()
    };
    // 600 requests counted over the 60 windows since the stage was first seen: 10 a window,
    // and 150 is 15 times that: a spike, in the very first window.
    assert_eq!(
        burst(restarted(&[("list pods", 600)], -3600)),
        vec![AnomalyKind::VolumeSpike]
    );
    // 20 a window: 150 is 7.5 times that.
    assert!(burst(restarted(&[("list pods", 1200)], -3600)).is_empty());
    // Without the persisted state the baseline is learnt afresh: nothing for 5 windows.
    assert!(burst(stage()).is_empty());
}

#[test]
fn a_forgotten_stage_starts_over() {
    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    tracker.observe(
        stage(),
        req("list", "pods", None, Verdict::Allow, 1),
        PodIps::Unknown,
        &mut out,
    );
    assert!(tracker.knows(&stage().user));
    assert_eq!(tracker.usage(&stage()).unwrap().0[1].count, 1);
    tracker.forget(&stage().user);
    assert!(!tracker.knows(&stage().user));
    assert!(
        tracker.usage(&stage()).is_none(),
        "nothing of its usage is kept"
    );
    // The request counted before is still recorded at the window's end.
    out.clear();
    tracker.flush(t(60), &mut out);
    assert_eq!(records(&out).len(), 1);
    assert!(!out.iter().any(|o| matches!(o, Output::Usage(_))));
}

#[test]
fn a_stage_seen_for_the_first_time_gets_its_since_written_even_without_usage() {
    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    tracker.observe(
        stage(),
        req("list", "secrets", None, Verdict::Deny, 3),
        PodIps::Unknown,
        &mut out,
    );
    out.clear();
    tracker.flush(t(60), &mut out);
    let update = out
        .iter()
        .find_map(|o| match o {
            Output::Usage(u) => Some(u.clone()),
            _ => None,
        })
        .expect("a usage update with usageSince");
    assert_eq!(update.since, t(3));
    assert!(update.usage.iter().all(|u| !u.used));
}

/// The decision log's hash covers the record as read back; every record must read back as
/// written (a float that does not would make `audit verify` report it edited).
#[test]
fn every_record_reads_back_as_written_whatever_the_baseline() {
    let thresholds = Thresholds {
        baseline_windows: 1,
        spike_min_requests: 1,
        spike_factor: 1.01,
        ..Thresholds::default()
    };
    let mut tracker = Tracker::new(thresholds);
    let mut out = Vec::new();
    // Window sizes that make the moving average every kind of fraction, and spikes among them.
    let mut at = 0;
    for w in 0..300i64 {
        let n = (w * 7919 % 13) + 1 + if w % 17 == 0 { 40 } else { 0 };
        for _ in 0..n {
            tracker.observe(
                stage(),
                req("list", "pods", None, Verdict::Allow, at),
                PodIps::Unknown,
                &mut out,
            );
        }
        at += 60;
        tracker.flush(t(at), &mut out);
    }
    let mut spikes = 0;
    for o in &out {
        let entry = match o {
            Output::Record(e) => e,
            Output::Anomaly(a, e) => {
                spikes += usize::from(a.kind == AnomalyKind::VolumeSpike);
                e
            }
            Output::Usage(_) => continue,
        };
        let record = crate::audit::Record::new(entry, 1, t(0), &"0".repeat(64), b"key");
        let written = serde_json::to_value(&record).unwrap();
        let read: Value = serde_json::from_str(&written.to_string()).unwrap();
        assert_eq!(
            crate::audit::canonical_json(&read),
            crate::audit::canonical_json(&written)
        );
    }
    assert!(spikes > 10, "{spikes} spikes");
}
