//! Renders plans as a table for people, YAML for `kubectl apply`, or JSON for tools.
//!
//! Everything is written straight to an [`io::Write`]: no document is built in memory first.
//! The table and the YAML stream are written one plan at a time (`TableWriter`,
//! `YamlWriter`), so `portcullis plan` can drop each plan once it is written; the JSON
//! document has one section per kind of thing across all plans, so it needs them all at once
//! ([`write_json`]). The `String` functions ([`table`], [`yaml`], [`json`]) wrap the writers.

use std::fmt;
use std::io::{self, Write};

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

use crate::plan::{CredentialRequest, Object, Plan, RestartRef, VaultPolicy, VaultRole};
use crate::policy::{Decision, Reason, Verdict};

/// `system:serviceaccount:<namespace>:<service account>`, written where it is needed.
struct Subject<'a> {
    namespace: &'a str,
    service_account: &'a str,
}

impl<'a> Subject<'a> {
    fn of(plan: &'a Plan, stage: &str) -> Subject<'a> {
        Subject {
            namespace: &plan.namespace,
            service_account: plan
                .stages
                .iter()
                .find(|s| s.name == stage)
                .map(|s| s.service_account.as_str())
                .unwrap_or_default(),
        }
    }
}

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

fn as_text<T: fmt::Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

// The views below are what the JSON output shows, borrowed from the plans. Their fields are in
// alphabetical order: the JSON keys have always been sorted, and serde writes struct fields in
// declaration order.

/// One decision, with the pipeline and the subject it is about.
#[derive(Serialize)]
struct DecisionView<'a> {
    field: &'a str,
    #[serde(serialize_with = "as_text")]
    item: &'a crate::policy::Item,
    kind: &'static str,
    message: &'a str,
    namespace: &'a str,
    pipeline: &'a str,
    reason: Reason,
    stage: &'a str,
    #[serde(serialize_with = "as_text")]
    subject: Subject<'a>,
    /// Set on a grant `plan` could not check offline (a named Secret, a restart target).
    #[serde(skip_serializing_if = "Option::is_none")]
    unverified: Option<&'static str>,
    verdict: Verdict,
}

impl<'a> DecisionView<'a> {
    fn new(plan: &'a Plan, d: &'a Decision) -> DecisionView<'a> {
        DecisionView {
            field: &d.field,
            item: &d.item,
            kind: d.item.kind(),
            message: &d.message,
            namespace: &plan.namespace,
            pipeline: &plan.pipeline,
            reason: d.reason,
            stage: &d.stage,
            subject: Subject::of(plan, &d.stage),
            unverified: plan.unverified(d),
            verdict: d.verdict,
        }
    }
}

/// One credential request, with its pipeline.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CredentialView<'a> {
    name: &'a str,
    namespace: &'a str,
    path: &'a str,
    pipeline: &'a str,
    restart_targets: &'a [RestartRef],
    secret_name: &'a str,
    stage: &'a str,
    ttl: u64,
}

impl<'a> CredentialView<'a> {
    fn new(plan: &'a Plan, c: &'a CredentialRequest) -> CredentialView<'a> {
        CredentialView {
            name: &c.name,
            namespace: &plan.namespace,
            path: &c.path,
            pipeline: &plan.pipeline,
            restart_targets: &c.restart_targets,
            secret_name: &c.secret_name,
            stage: &c.stage,
            ttl: c.ttl,
        }
    }
}

/// A Vault policy: its name and its HCL.
#[derive(Serialize)]
struct PolicyView<'a> {
    hcl: String,
    name: &'a str,
}

impl<'a> From<&'a VaultPolicy> for PolicyView<'a> {
    fn from(p: &'a VaultPolicy) -> PolicyView<'a> {
        PolicyView {
            hcl: p.hcl(),
            name: &p.name,
        }
    }
}

/// A Vault role, with Vault's field names.
#[derive(Serialize)]
struct RoleView<'a> {
    bound_service_account_names: &'a [String],
    bound_service_account_namespaces: &'a [String],
    name: &'a str,
    stage: &'a str,
    token_max_ttl: u64,
    token_policies: &'a [String],
    token_ttl: u64,
}

impl<'a> From<&'a VaultRole> for RoleView<'a> {
    fn from(r: &'a VaultRole) -> RoleView<'a> {
        RoleView {
            bound_service_account_names: &r.bound_service_account_names,
            bound_service_account_namespaces: &r.bound_service_account_namespaces,
            name: &r.name,
            stage: &r.stage,
            token_max_ttl: r.token_max_ttl,
            token_policies: &r.token_policies,
            token_ttl: r.token_ttl,
        }
    }
}

/// A Kubernetes object with its keys sorted at every level, as the JSON output has always
/// shown them (k8s-openapi writes `apiVersion` and `kind` first). Only this one object is
/// turned into a [`serde_json::Value`] on the way, never the document.
struct SortedObject<'a>(&'a Object);

impl Serialize for SortedObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let value = serde_json::to_value(self.0).map_err(serde::ser::Error::custom)?;
        value.serialize(serializer)
    }
}

/// A JSON array of what `items` yields, serialized as it is produced.
struct Seq<F>(F);

impl<F, I> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq((self.0)())
    }
}

/// `{credentials, decisions, objects, vault: {policies, roles}}` over all plans.
struct Document<'a>(&'a [Plan]);

impl Serialize for Document<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let plans = self.0;
        let mut doc = serializer.serialize_struct("Document", 4)?;
        doc.serialize_field(
            "credentials",
            &Seq(|| {
                plans.iter().flat_map(|p| {
                    p.vault
                        .credentials
                        .iter()
                        .map(move |c| CredentialView::new(p, c))
                })
            }),
        )?;
        doc.serialize_field(
            "decisions",
            &Seq(|| {
                plans
                    .iter()
                    .flat_map(|p| p.decisions.iter().map(move |d| DecisionView::new(p, d)))
            }),
        )?;
        doc.serialize_field(
            "objects",
            &Seq(|| plans.iter().flat_map(|p| &p.objects).map(SortedObject)),
        )?;
        doc.serialize_field("vault", &VaultSection(plans))?;
        doc.end()
    }
}

/// `{policies, roles}` over all plans.
struct VaultSection<'a>(&'a [Plan]);

impl Serialize for VaultSection<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let plans = self.0;
        let mut vault = serializer.serialize_struct("Vault", 2)?;
        vault.serialize_field(
            "policies",
            &Seq(|| {
                plans
                    .iter()
                    .flat_map(|p| &p.vault.policies)
                    .map(PolicyView::from)
            }),
        )?;
        vault.serialize_field(
            "roles",
            &Seq(|| {
                plans
                    .iter()
                    .flat_map(|p| &p.vault.roles)
                    .map(RoleView::from)
            }),
        )?;
        vault.end()
    }
}

/// Writes `{objects, vault: {policies, roles}, credentials, decisions}` for all plans, as one
/// pretty-printed JSON document (keys sorted) and a newline.
pub fn write_json(plans: &[Plan], mut out: impl Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut out, &Document(plans))?;
    out.write_all(b"\n")
}

/// [`write_json`] into a `String`.
pub fn json(plans: &[Plan]) -> String {
    let mut out = Vec::new();
    write_json(plans, &mut out).expect("plans serialize to JSON");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// Writes the Kubernetes objects as a YAML stream ready for `kubectl apply -f -`, then the
/// Vault policies and roles as comments (they are not Kubernetes objects), one plan at a time.
///
/// The objects of each plan are written as the plan is given; the comments, which come after
/// every object, are kept as text until [`YamlWriter::finish`].
pub(crate) struct YamlWriter<W: Write> {
    out: W,
    /// One object's YAML, reused.
    object: String,
    /// The Vault comments of the plans written so far.
    vault: String,
}

impl<W: Write> YamlWriter<W> {
    pub(crate) fn new(out: W) -> YamlWriter<W> {
        YamlWriter {
            out,
            object: String::new(),
            vault: String::new(),
        }
    }

    /// Writes the objects of `plan`, and keeps its Vault comments for the end.
    pub(crate) fn plan(&mut self, plan: &Plan) -> io::Result<()> {
        for object in &plan.objects {
            self.object.clear();
            serde_saphyr::to_fmt_writer(&mut self.object, object)
                .expect("objects serialize to YAML");
            self.out.write_all(b"---\n")?;
            self.out.write_all(self.object.as_bytes())?;
        }
        vault_comments(plan, &mut self.vault);
        Ok(())
    }

    /// Writes the Vault comments and returns the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.out.write_all(self.vault.as_bytes())?;
        Ok(self.out)
    }
}

fn vault_comments(plan: &Plan, out: &mut String) {
    use std::fmt::Write as _;
    for policy in &plan.vault.policies {
        let _ = writeln!(out, "# Vault policy sys/policies/acl/{}", policy.name);
        for line in policy.hcl().lines() {
            if line.is_empty() {
                out.push_str("#\n");
            } else {
                let _ = writeln!(out, "#   {line}");
            }
        }
    }
    for role in &plan.vault.roles {
        let _ = writeln!(
            out,
            "# Vault role auth/<workloads mount>/role/{}: bound_service_account_names={} bound_service_account_namespaces={} token_policies={} token_ttl={}s token_max_ttl={}s",
            role.name,
            role.bound_service_account_names.join(","),
            role.bound_service_account_namespaces.join(","),
            role.token_policies.join(","),
            role.token_ttl,
            role.token_max_ttl
        );
    }
}

/// [`YamlWriter`] over all `plans`.
fn write_yaml(plans: &[Plan], out: impl Write) -> io::Result<()> {
    let mut writer = YamlWriter::new(out);
    for plan in plans {
        writer.plan(plan)?;
    }
    writer.finish()?;
    Ok(())
}

/// `write_yaml` into a `String`.
pub fn yaml(plans: &[Plan]) -> String {
    let mut out = Vec::new();
    write_yaml(plans, &mut out).expect("writing to memory does not fail");
    String::from_utf8(out).expect("YAML is UTF-8")
}

/// Writes, per stage, what is granted and what is denied and why, one plan at a time; then,
/// at [`TableWriter::finish`], the totals.
pub(crate) struct TableWriter<W: Write> {
    out: W,
    pipelines: u64,
    stages: u64,
    granted: u64,
    denied: u64,
}

impl<W: Write> TableWriter<W> {
    pub(crate) fn new(out: W) -> TableWriter<W> {
        TableWriter {
            out,
            pipelines: 0,
            stages: 0,
            granted: 0,
            denied: 0,
        }
    }

    /// Writes the stages of `plan`.
    pub(crate) fn plan(&mut self, plan: &Plan) -> io::Result<()> {
        let out = &mut self.out;
        self.pipelines += 1;
        writeln!(out, "AIPipeline {}/{}", plan.namespace, plan.pipeline)?;
        for stage in &plan.stages {
            self.stages += 1;
            self.granted += u64::from(stage.granted);
            self.denied += u64::from(stage.denied);
            write!(
                out,
                "  stage {} ({}) runs as ServiceAccount {}; bound by ",
                stage.name,
                stage.role.as_str(),
                stage.service_account
            )?;
            if stage.guardrails.is_empty() {
                writeln!(out, "built-in defaults (no AccessGuardrail applies)")?;
            } else {
                writeln!(out, "AccessGuardrail {}", stage.guardrails.join(", "))?;
            }
            for d in plan.decisions.iter().filter(|d| d.stage == stage.name) {
                if let Some(why) = plan.unverified(d) {
                    writeln!(out, "    GRANT {}  [unverified]", d.item)?;
                    writeln!(out, "          {why}")?;
                } else if d.is_allowed() {
                    writeln!(out, "    GRANT {}", d.item)?;
                } else {
                    writeln!(out, "    DENY  {}  [{}]", d.item, d.reason)?;
                    writeln!(out, "          {}", d.message)?;
                }
            }
        }
        let mut names = plan.vault.policies.iter().map(|p| p.name.as_str());
        if let Some(first) = names.next() {
            write!(out, "  vault policies and roles: {first}")?;
            for name in names {
                write!(out, ", {name}")?;
            }
            writeln!(out)?;
        }
        writeln!(out)
    }

    /// Writes the totals and returns the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        writeln!(
            self.out,
            "{} pipelines, {} stages: {} granted, {} denied.",
            self.pipelines, self.stages, self.granted, self.denied
        )?;
        Ok(self.out)
    }
}

/// [`TableWriter`] over all `plans`.
fn write_table(plans: &[Plan], out: impl Write) -> io::Result<()> {
    let mut writer = TableWriter::new(out);
    for plan in plans {
        writer.plan(plan)?;
    }
    writer.finish()?;
    Ok(())
}

/// `write_table` into a `String`.
pub fn table(plans: &[Plan]) -> String {
    let mut out = Vec::new();
    write_table(plans, &mut out).expect("writing to memory does not fail");
    String::from_utf8(out).expect("the table is UTF-8")
}
