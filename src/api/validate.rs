//! Checks what the CRD schema checks (and the cross-field CEL rules), in Rust, so that
//! `portcullis plan` refuses the same input the API server would, and says how to fix it.
//! A test in `tests/schema.rs` keeps these checks and the schema's patterns in agreement.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Deref;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{
    AIPipeline, AccessGuardrail, Ceiling, EgressRule, IngressRule, NetworkPort, PermissionRule,
    Stage, StageVault, VaultCredential,
};

/// The longest credential or token lifetime a pipeline may ask for: 87600h (ten years).
///
/// The CRD schema accepts any duration of up to 16 characters (`999999999999999h` is more than
/// 10^11 years), which no clock arithmetic can hold: a lease's expiry is `now + ttl` in chrono,
/// whose durations end at about 2.9 * 10^8 years and whose dates end in the year 262143. So
/// [`validate`] refuses a longer lifetime, naming the field and this limit, and everything
/// downstream may add a validated lifetime to a date without overflow. Ten years is far above
/// any lifetime Vault grants in practice (its default `max_lease_ttl` is 32 days).
pub const TTL_LIMIT_SECONDS: u64 = 87_600 * 3600;

/// One thing wrong with an object: where (a field path such as `spec.stages[1].name`) and what
/// to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl fmt::Display, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }
}

/// A field path such as `spec.stages[1].name`, written out only when an error names it: valid
/// input, the common case, costs no strings.
#[derive(Clone, Copy)]
struct Field<'a> {
    parent: Option<&'a Field<'a>>,
    part: Part<'a>,
}

#[derive(Clone, Copy)]
enum Part<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Field<'a> {
    fn root(key: &'a str) -> Field<'a> {
        Field {
            parent: None,
            part: Part::Key(key),
        }
    }

    /// `self.key`
    fn key(&'a self, key: &'a str) -> Field<'a> {
        Field {
            parent: Some(self),
            part: Part::Key(key),
        }
    }

    /// `self[index]`
    fn at(&'a self, index: usize) -> Field<'a> {
        Field {
            parent: Some(self),
            part: Part::Index(index),
        }
    }
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            write!(f, "{parent}")?;
        }
        match self.part {
            Part::Key(key) if self.parent.is_some() => write!(f, ".{key}"),
            Part::Key(key) => f.write_str(key),
            Part::Index(index) => write!(f, "[{index}]"),
        }
    }
}

/// Lower-case letters, digits and '-', starting and ending alphanumeric; any length.
fn is_label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 label: at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && is_label_chars(s)
}

/// A DNS-1123 subdomain as Kubernetes checks it: at most 253 characters in all.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_chars)
}

fn is_api_group(s: &str) -> bool {
    s.is_empty() || s == "*" || is_dns_subdomain(s)
}

fn is_resource(s: &str) -> bool {
    let part = |p: &str| p == "*" || is_label_chars(p);
    if s.len() > 253 {
        return false;
    }
    match s.split_once('/') {
        Some((resource, sub)) => part(resource) && part(sub),
        None => part(s),
    }
}

fn is_verb(s: &str) -> bool {
    s == "*" || (!s.is_empty() && s.len() <= 32 && s.bytes().all(|c| c.is_ascii_lowercase()))
}

/// Parses a duration such as `15m`, `1h30m` or `900s` into seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' => digits.push(c),
            'h' | 'm' | 's' if !digits.is_empty() => {
                let n: u64 = digits.parse().ok()?;
                let unit = match c {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
                total = total.checked_add(n.checked_mul(unit)?)?;
                digits.clear();
            }
            _ => return None,
        }
    }
    digits.is_empty().then_some(total)
}

/// Writes seconds as the shortest duration string: 3600 -> `1h`, 5400 -> `1h30m`.
pub(crate) fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
        if n > 0 {
            out.push_str(&n.to_string());
            out.push(unit);
        }
    }
    out
}

/// Parses a CIDR and insists on its canonical form (no host bits), the way a reader expects it.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if s.len() > 43 {
        return Err(format!(
            "{s:?} is longer than a CIDR can be; write it as 10.20.0.0/16 or fd00::/8"
        ));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!("{s:?} is not a CIDR; write an address and a prefix length, such as 10.20.0.0/16")
    })?;
    if net.network() != net.addr() {
        return Err(format!(
            "{s:?} has host bits set; write the network address, {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Characters of a Vault path. Quotes, backslashes, braces and `$` are never among them: paths
/// are written into HCL policies.
fn is_vault_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.@=:,~+/".contains(c)
}

fn is_vault_acl_path(s: &str) -> bool {
    let body = s.strip_suffix('*').unwrap_or(s);
    !body.is_empty() && s.len() <= 512 && !body.starts_with('/') && body.chars().all(is_vault_char)
}

fn is_vault_secret_path(s: &str) -> bool {
    is_vault_acl_path(s) && !s.contains(['*', '+'])
}

fn check_selector(errors: &mut Errors, field: &Field<'_>, selector: &LabelSelector) {
    // What kube's Selector refuses: an unknown operator, or In or NotIn without values. Most
    // selectors have neither, and need not be copied to find out.
    let plain = selector
        .match_expressions
        .iter()
        .flatten()
        .all(|r| match r.operator.as_str() {
            "In" | "NotIn" => r.values.is_some(),
            "Exists" | "DoesNotExist" => true,
            _ => false,
        });
    if plain {
        return;
    }
    if let Err(e) = kube::core::Selector::try_from(selector.clone()) {
        errors.push(
            field,
            format!(
                "{e}; use matchLabels, or matchExpressions with In, NotIn, Exists or DoesNotExist"
            ),
        );
    }
}

fn check_ports(errors: &mut Errors, field: &Field<'_>, ports: &[NetworkPort]) {
    if ports.len() > 16 {
        errors.push(field, "at most 16 ports; split the rule in two");
    }
    for (i, p) in ports.iter().enumerate() {
        if p.port == 0 {
            errors.push(
                field.at(i).key("port"),
                "port 0 is not a port; use 1 to 65535",
            );
        }
    }
}

fn check_duration(errors: &mut Errors, field: &Field<'_>, value: &str) {
    match parse_duration(value) {
        Some(0) => errors.push(field, format!("{value:?} is zero; give a lifetime such as 15m")),
        Some(_) if value.len() <= 16 => {}
        _ => errors.push(
            field,
            format!("{value:?} is not a duration; use hours, minutes and seconds such as 15m, 1h or 1h30m"),
        ),
    }
}

/// An object that passed validation, with the values validation parsed kept in typed form:
/// durations as seconds (within [`TTL_LIMIT_SECONDS`]) and CIDRs as [`IpNet`]. Nothing
/// downstream parses them again, so nothing downstream has to decide what an unparsable value
/// would mean.
///
/// Only [`validate`] makes one, and the object cannot be changed afterwards: it is read through
/// `Deref` (or [`Validated::pipeline`]).
///
/// `T` is how the object is held: `Validated<AIPipeline>` owns it (as `portcullis plan` keeps
/// what it read), `Validated<&AIPipeline>` borrows it (to plan a pipeline held elsewhere, such
/// as the controller's cached one, without copying it).
#[derive(Debug, Clone, PartialEq)]
pub struct Validated<T> {
    object: T,
    stages: Vec<StageValues>,
}

/// What validation parsed in one stage, in the order of the stage's lists.
#[derive(Debug, Clone, PartialEq)]
struct StageValues {
    /// `vault.tokenTTL`, in seconds.
    token_ttl: Option<u64>,
    /// `vault.credentials[].ttl`, in seconds.
    credential_ttls: Vec<u64>,
    /// `network.egress[].cidr`.
    egress_cidrs: Vec<Option<IpNet>>,
    /// `network.ingress[].fromCIDR`.
    ingress_cidrs: Vec<Option<IpNet>>,
}

impl<T> Deref for Validated<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.object
    }
}

impl<P: Borrow<AIPipeline>> Validated<P> {
    /// The pipeline.
    pub fn pipeline(&self) -> &AIPipeline {
        self.object.borrow()
    }

    /// Stage `index` of `spec.stages`, with its parsed values.
    ///
    /// # Panics
    /// When there is no such stage.
    pub fn stage(&self, index: usize) -> ValidStage<'_> {
        ValidStage {
            stage: &self.pipeline().spec.stages[index],
            values: &self.stages[index],
        }
    }

    /// The stages, in spec order, with their parsed values.
    pub fn stages(&self) -> impl ExactSizeIterator<Item = ValidStage<'_>> {
        self.pipeline()
            .spec
            .stages
            .iter()
            .zip(&self.stages)
            .map(|(stage, values)| ValidStage { stage, values })
    }
}

/// One stage of a [`Validated`] pipeline: the stage (through `Deref`) and its parsed values.
#[derive(Debug, Clone, Copy)]
pub struct ValidStage<'a> {
    stage: &'a Stage,
    values: &'a StageValues,
}

impl<'a> Deref for ValidStage<'a> {
    type Target = Stage;

    fn deref(&self) -> &Stage {
        self.stage
    }
}

impl<'a> ValidStage<'a> {
    /// The stage itself.
    pub fn get(&self) -> &'a Stage {
        self.stage
    }

    /// `vault.tokenTTL` in seconds, when set.
    pub fn token_ttl(&self) -> Option<u64> {
        self.values.token_ttl
    }

    /// `vault.credentials`, each with its `ttl` in seconds.
    pub fn credentials(&self) -> impl Iterator<Item = (&'a VaultCredential, u64)> + use<'a> {
        let ttls = &self.values.credential_ttls;
        self.stage
            .vault
            .iter()
            .flat_map(|v| &v.credentials)
            .zip(ttls.iter().copied())
    }

    /// `network.egress`, each with its `cidr` parsed (None for a namespace destination).
    pub fn egress(&self) -> impl Iterator<Item = (&'a EgressRule, Option<IpNet>)> + use<'a> {
        let cidrs = &self.values.egress_cidrs;
        self.stage
            .network
            .iter()
            .flat_map(|n| &n.egress)
            .zip(cidrs.iter().copied())
    }

    /// `network.ingress`, each with its `fromCIDR` parsed (None for a selector source).
    pub fn ingress(&self) -> impl Iterator<Item = (&'a IngressRule, Option<IpNet>)> + use<'a> {
        let cidrs = &self.values.ingress_cidrs;
        self.stage
            .network
            .iter()
            .flat_map(|n| &n.ingress)
            .zip(cidrs.iter().copied())
    }
}

/// Validates `pipeline` as [`validate_pipeline`] does, then refuses what the CRD schema cannot
/// express (a lifetime over [`TTL_LIMIT_SECONDS`]), and keeps what it parsed. Every error is
/// returned, each naming its field.
///
/// The API server stores a pipeline that only this second step refuses; the controller then
/// reports it invalid in the pipeline's status, as it does any other invalid pipeline.
pub fn validate<P: Borrow<AIPipeline>>(pipeline: P) -> Result<Validated<P>, Vec<FieldError>> {
    let object = pipeline;
    let pipeline: &AIPipeline = object.borrow();
    let mut errors = Errors(validate_pipeline(pipeline));
    let stages_field = Field::root("spec.stages");
    let stages = pipeline
        .spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let field = stages_field.at(i);
            let vault = field.key("vault");
            let credentials = vault.key("credentials");
            let network = stage.network.as_ref();
            StageValues {
                token_ttl: stage.vault.as_ref().and_then(|v| {
                    let ttl = v.token_ttl.as_deref()?;
                    Some(limited_ttl(&mut errors, &vault.key("tokenTTL"), ttl))
                }),
                credential_ttls: stage
                    .vault
                    .iter()
                    .flat_map(|v| &v.credentials)
                    .enumerate()
                    .map(|(j, c)| limited_ttl(&mut errors, &credentials.at(j).key("ttl"), &c.ttl))
                    .collect(),
                egress_cidrs: network
                    .iter()
                    .flat_map(|n| &n.egress)
                    .map(|r| r.cidr.as_deref().and_then(|c| parse_cidr(c).ok()))
                    .collect(),
                ingress_cidrs: network
                    .iter()
                    .flat_map(|n| &n.ingress)
                    .map(|r| r.from_cidr.as_deref().and_then(|c| parse_cidr(c).ok()))
                    .collect(),
            }
        })
        .collect();
    if errors.0.is_empty() {
        Ok(Validated { object, stages })
    } else {
        Err(errors.0)
    }
}

/// A lifetime in seconds; refused (with an error on `field`) over [`TTL_LIMIT_SECONDS`]. The
/// value returned with an error is never used: [`validate`] then returns the errors.
fn limited_ttl(errors: &mut Errors, field: &Field<'_>, value: &str) -> u64 {
    match parse_duration(value) {
        Some(seconds) if seconds <= TTL_LIMIT_SECONDS => seconds,
        Some(_) => {
            let limit = format_duration(TTL_LIMIT_SECONDS);
            errors.push(
                field,
                format!(
                    "{value:?} is longer than {limit} (ten years), the longest lifetime Portcullis accepts; ask for {limit} or less"
                ),
            );
            0
        }
        // validate_pipeline has reported it.
        None => 0,
    }
}

/// Checks an AIPipeline the way its CRD schema and CEL rules would. Empty when valid.
pub fn validate_pipeline(pipeline: &AIPipeline) -> Vec<FieldError> {
    let mut errors = Errors(Vec::new());
    match pipeline.metadata.name.as_deref() {
        None | Some("") => errors.push("metadata.name", "missing; give the pipeline a name"),
        Some(name) if !is_dns_subdomain(name) => errors.push(
            "metadata.name",
            format!(
                "{name:?} is not a DNS-1123 subdomain; use lower-case letters, digits, '-' and '.'"
            ),
        ),
        Some(_) => {}
    }
    if let Some(ns) = pipeline.metadata.namespace.as_deref()
        && !is_dns_label(ns)
    {
        errors.push(
            "metadata.namespace",
            format!("{ns:?} is not a namespace name; use lower-case letters, digits and '-'"),
        );
    }
    let stages = &pipeline.spec.stages;
    if stages.is_empty() {
        errors.push("spec.stages", "no stages; list at least one stage");
    }
    if stages.len() > 16 {
        errors.push(
            "spec.stages",
            format!("{} stages; at most 16 are allowed", stages.len()),
        );
    }
    let mut names = BTreeSet::new();
    let mut secrets: Vec<(&str, &str)> = Vec::new();
    let stages_field = Field::root("spec.stages");
    for (i, stage) in stages.iter().enumerate() {
        let field = stages_field.at(i);
        if !names.insert(stage.name.as_str()) {
            errors.push(
                field.key("name"),
                format!(
                    "stage {:?} appears twice; give every stage its own name",
                    stage.name
                ),
            );
        }
        check_stage(&mut errors, &field, stage);
        for (j, c) in stage.vault.iter().flat_map(|v| &v.credentials).enumerate() {
            if let Some((other, _)) = secrets.iter().find(|(_, s)| *s == c.secret_name) {
                errors.push(
                    format_args!("{field}.vault.credentials[{j}].secretName"),
                    format!(
                        "Secret {:?} already receives credentials of stage {other:?}; give each credential its own secretName",
                        c.secret_name
                    ),
                );
            } else {
                secrets.push((&stage.name, &c.secret_name));
            }
        }
    }
    errors.0
}

fn check_stage(errors: &mut Errors, field: &Field<'_>, stage: &Stage) {
    if stage.name.len() > 40 || !is_dns_label(&stage.name) {
        errors.push(
            field.key("name"),
            format!(
                "{:?} is not a stage name; use at most 40 lower-case letters, digits and '-', starting and ending with a letter or digit",
                stage.name
            ),
        );
    }
    if let Some(selector) = &stage.pod_selector {
        check_selector(errors, &field.key("podSelector"), selector);
    }
    let permissions = field.key("permissions");
    if stage.permissions.len() > 32 {
        errors.push(
            permissions,
            "at most 32 rules; merge rules that share verbs",
        );
    }
    for (i, rule) in stage.permissions.iter().enumerate() {
        check_permission(errors, &permissions.at(i), rule);
    }
    if let Some(network) = &stage.network {
        let network_field = field.key("network");
        let egress = network_field.key("egress");
        for (i, rule) in network.egress.iter().enumerate() {
            check_egress(errors, &egress.at(i), rule);
        }
        let ingress = network_field.key("ingress");
        for (i, rule) in network.ingress.iter().enumerate() {
            check_ingress(errors, &ingress.at(i), rule);
        }
        for (list, len) in [
            ("egress", network.egress.len()),
            ("ingress", network.ingress.len()),
        ] {
            if len > 32 {
                errors.push(network_field.key(list), "at most 32 rules");
            }
        }
    }
    if let Some(vault) = &stage.vault {
        check_vault(errors, &field.key("vault"), vault);
    }
    let produces = field.key("produces");
    for (i, item) in stage.produces.iter().enumerate() {
        let valid = item
            .split_once('/')
            .is_some_and(|(r, n)| matches!(r, "configmaps" | "secrets") && is_dns_subdomain(n));
        if !valid {
            errors.push(
                produces.at(i),
                format!("{item:?} is not an object; write configmaps/<name> or secrets/<name>"),
            );
        }
    }
}

/// (field name, values, check, a valid example)
type ListCheck<'a> = (&'a str, &'a [String], fn(&str) -> bool, &'a str);

fn check_permission(errors: &mut Errors, field: &Field<'_>, rule: &PermissionRule) {
    let lists: [ListCheck<'_>; 3] = [
        (
            "apiGroups",
            &rule.api_groups,
            is_api_group,
            "an API group such as \"\" (core) or \"apps\"",
        ),
        (
            "resources",
            &rule.resources,
            is_resource,
            "a plural resource name such as \"configmaps\" or \"pods/log\"",
        ),
        (
            "verbs",
            &rule.verbs,
            is_verb,
            "a lower-case verb such as \"get\"",
        ),
    ];
    for (name, values, valid, hint) in lists {
        let list = field.key(name);
        if values.is_empty() {
            errors.push(list, format!("empty; list at least one, such as {hint}"));
        }
        for (i, v) in values.iter().enumerate() {
            if !valid(v) {
                errors.push(list.at(i), format!("{v:?} is not valid; use {hint}"));
            }
        }
    }
    for (i, n) in rule.resource_names.iter().enumerate() {
        if n.is_empty() || n.len() > 253 || n.contains('/') {
            errors.push(
                field.key("resourceNames").at(i),
                format!("{n:?} is not an object name; use the name of one object"),
            );
        }
    }
}

fn check_egress(errors: &mut Errors, field: &Field<'_>, rule: &EgressRule) {
    match (&rule.cidr, &rule.namespace) {
        (Some(_), Some(_)) | (None, None) => errors.push(
            field,
            "set exactly one of cidr or namespace; write two rules for two destinations",
        ),
        _ => {}
    }
    if let Some(cidr) = &rule.cidr
        && let Err(e) = parse_cidr(cidr)
    {
        errors.push(field.key("cidr"), e);
    }
    if let Some(ns) = &rule.namespace
        && !is_dns_label(ns)
    {
        errors.push(
            field.key("namespace"),
            format!("{ns:?} is not a namespace name"),
        );
    }
    if let Some(selector) = &rule.pod_selector {
        let pod_selector = field.key("podSelector");
        if rule.namespace.is_none() {
            errors.push(
                pod_selector,
                "podSelector narrows a namespace destination; set namespace too, or remove podSelector",
            );
        }
        check_selector(errors, &pod_selector, selector);
    }
    check_ports(errors, &field.key("ports"), &rule.ports);
}

fn check_ingress(errors: &mut Errors, field: &Field<'_>, rule: &IngressRule) {
    let by_labels = rule.from_namespace_selector.is_some() || rule.from_pod_selector.is_some();
    if rule.from_cidr.is_some() == by_labels {
        errors.push(
            field,
            "set fromCIDR, or fromNamespaceSelector and/or fromPodSelector",
        );
    }
    if let Some(cidr) = &rule.from_cidr
        && let Err(e) = parse_cidr(cidr)
    {
        errors.push(field.key("fromCIDR"), e);
    }
    if let Some(s) = &rule.from_namespace_selector {
        check_selector(errors, &field.key("fromNamespaceSelector"), s);
    }
    if let Some(s) = &rule.from_pod_selector {
        check_selector(errors, &field.key("fromPodSelector"), s);
    }
    check_ports(errors, &field.key("ports"), &rule.ports);
}

fn check_vault(errors: &mut Errors, field: &Field<'_>, vault: &StageVault) {
    let policies = field.key("policies");
    for (i, rule) in vault.policies.iter().enumerate() {
        if !is_vault_acl_path(&rule.path) || rule.path.len() > 512 {
            errors.push(
                policies.at(i).key("path"),
                format!(
                    "{:?} is not a Vault path; use letters, digits and -_.@=:,~+/ without a leading '/', with '*' only at the end, such as kv/data/team/app/*",
                    rule.path
                ),
            );
        }
        if rule.capabilities.is_empty() {
            errors.push(
                policies.at(i).key("capabilities"),
                "empty; list at least one, such as read",
            );
        }
    }
    if let Some(ttl) = &vault.token_ttl {
        check_duration(errors, &field.key("tokenTTL"), ttl);
    }
    let mut names = BTreeSet::new();
    let credentials = field.key("credentials");
    for (i, c) in vault.credentials.iter().enumerate() {
        let f = credentials.at(i);
        if !is_dns_label(&c.name) {
            errors.push(
                f.key("name"),
                format!("{:?} is not a DNS-1123 label", c.name),
            );
        }
        if !names.insert(c.name.as_str()) {
            errors.push(
                f.key("name"),
                format!("credential {:?} appears twice in the stage", c.name),
            );
        }
        if !is_vault_secret_path(&c.path) || c.path.len() > 512 {
            errors.push(
                f.key("path"),
                format!(
                    "{:?} is not a concrete Vault path; name the path that issues credentials, such as database/creds/reader: letters, digits and -_.@=:,~/ without '*' or '+'",
                    c.path
                ),
            );
        }
        check_duration(errors, &f.key("ttl"), &c.ttl);
        if !is_dns_subdomain(&c.secret_name) {
            errors.push(
                f.key("secretName"),
                format!("{:?} is not a Secret name", c.secret_name),
            );
        }
        for (j, t) in c.restart_targets.iter().enumerate() {
            if !is_dns_subdomain(&t.name) {
                errors.push(
                    f.key("restartTargets").at(j).key("name"),
                    format!("{:?} is not a workload name", t.name),
                );
            }
        }
    }
}

/// Checks an AccessGuardrail the way its CRD schema would. Empty when valid.
pub fn validate_guardrail(guardrail: &AccessGuardrail) -> Vec<FieldError> {
    let mut errors = Errors(Vec::new());
    if guardrail.metadata.name.as_deref().unwrap_or("").is_empty() {
        errors.push("metadata.name", "missing; give the guardrail a name");
    }
    check_selector(
        &mut errors,
        &Field::root("spec.namespaceSelector"),
        &guardrail.spec.namespace_selector,
    );
    for (i, cidr) in guardrail.spec.credential_endpoints.iter().enumerate() {
        if let Err(e) = parse_cidr(cidr) {
            errors.push(format_args!("spec.credentialEndpoints[{i}]"), e);
        }
    }
    for (i, named) in guardrail.spec.pod_creating_resources.iter().enumerate() {
        if !named.contains('.') || !is_dns_subdomain(named) {
            errors.push(
                format_args!("spec.podCreatingResources[{i}]"),
                format!("{named:?} is not <plural>.<group>; write it like workflows.argoproj.io"),
            );
        }
    }
    let roles = Field::root("spec.roles");
    for role in super::StageRole::ALL {
        if let Some(ceiling) = guardrail.spec.roles.get(role) {
            check_ceiling(&mut errors, &roles.key(role.guardrail_field()), ceiling);
        }
    }
    errors.0
}

fn check_ceiling(errors: &mut Errors, field: &Field<'_>, ceiling: &Ceiling) {
    let kubernetes = field.key("kubernetes");
    for (i, k) in ceiling.kubernetes.iter().enumerate() {
        let f = kubernetes.at(i);
        for (name, values, valid) in [
            ("apiGroups", &k.api_groups, is_api_group as fn(&str) -> bool),
            ("resources", &k.resources, is_resource),
            ("verbs", &k.verbs, is_verb),
        ] {
            let list = f.key(name);
            if values.is_empty() {
                errors.push(list, "empty; list at least one");
            }
            for (j, v) in values.iter().enumerate() {
                if !valid(v) {
                    errors.push(list.at(j), format!("{v:?} is not valid"));
                }
            }
        }
    }
    for (i, cidr) in ceiling.network.egress_cidrs.iter().enumerate() {
        if let Err(e) = parse_cidr(cidr) {
            errors.push(format_args!("{field}.network.egressCIDRs[{i}]"), e);
        }
    }
    for (i, cidr) in ceiling.network.ingress_cidrs.iter().enumerate() {
        if let Err(e) = parse_cidr(cidr) {
            errors.push(format_args!("{field}.network.ingressCIDRs[{i}]"), e);
        }
    }
    for (i, ns) in ceiling.network.ingress_namespaces.iter().enumerate() {
        if ns != "{namespace}" && !is_dns_label(ns) {
            errors.push(
                format_args!("{field}.network.ingressNamespaces[{i}]"),
                format!("{ns:?} is not a namespace name; use a name or {{namespace}}"),
            );
        }
    }
    for (i, ns) in ceiling.network.egress_namespaces.iter().enumerate() {
        if ns != "{namespace}" && !is_dns_label(ns) {
            errors.push(
                format_args!("{field}.network.egressNamespaces[{i}]"),
                format!("{ns:?} is not a namespace name; use a name or {{namespace}}"),
            );
        }
    }
    let vault = field.key("vault");
    let paths = vault.key("paths");
    for (i, p) in ceiling.vault.paths.iter().enumerate() {
        let f = paths.at(i);
        let filled = p
            .pattern
            .replace("{namespace}", "n")
            .replace("{pipeline}", "p")
            .replace("{stage}", "s");
        if !is_vault_acl_path(&filled) || p.pattern.len() > 512 {
            errors.push(
                f.key("pattern"),
                format!(
                    "{:?} is not a Vault path pattern; use letters, digits, -_.@=:,~+/ and the placeholders {{namespace}}, {{pipeline}}, {{stage}}, with '*' only at the end",
                    p.pattern
                ),
            );
        }
        let mut rest = p.pattern.as_str();
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find('}').map(|e| start + e);
            match end.map(|e| &rest[start..=e]) {
                Some("{namespace}" | "{pipeline}" | "{stage}") => {
                    rest = &rest[end.unwrap_or(0) + 1..]
                }
                _ => {
                    errors.push(
                        f.key("pattern"),
                        "unknown placeholder; only {namespace}, {pipeline} and {stage} are replaced",
                    );
                    break;
                }
            }
        }
        if let Some(problem) = ambiguous_placeholders(&p.pattern) {
            errors.push(f.key("pattern"), problem);
        }
        if p.capabilities.is_empty() {
            errors.push(
                f.key("capabilities"),
                "empty; list at least one, such as read",
            );
        }
    }
    if let Some(ttl) = &ceiling.vault.max_ttl {
        check_duration(errors, &vault.key("maxTTL"), ttl);
    }
}

/// What a valid guardrail allows that is probably wider than meant, one sentence each, for
/// `portcullis plan` to print as warnings.
pub fn guardrail_warnings(guardrail: &AccessGuardrail) -> Vec<String> {
    let name = guardrail.metadata.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for role in super::StageRole::ALL {
        let Some(ceiling) = guardrail.spec.roles.get(role) else {
            continue;
        };
        let field = format!("spec.roles.{}", role.guardrail_field());
        let logs = ceiling.kubernetes.iter().any(|k| {
            k.api_groups.iter().any(String::is_empty) && k.resources.iter().any(|r| r == "pods/log")
        });
        if logs {
            out.push(format!(
                "AccessGuardrail {name} {field}.kubernetes: pods/log lets {} stages read the logs of every pod in their namespace, other pipelines' included; stages should list resourceNames",
                role.as_str()
            ));
        }
        let n = &ceiling.network;
        if n.allow_ingress && n.ingress_cidrs.is_empty() && n.ingress_namespaces.is_empty() {
            out.push(format!(
                "AccessGuardrail {name} {field}.network: allowIngress without ingressCIDRs or ingressNamespaces lets {} stages accept connections from anywhere",
                role.as_str()
            ));
        }
        if ceiling.allow_workload_creation {
            out.push(format!(
                "AccessGuardrail {name} {field}.allowWorkloadCreation: {} stages may start pods as any ServiceAccount of their namespace",
                role.as_str()
            ));
        }
    }
    out
}

/// Characters that may stand next to a placeholder: none of them can occur in a namespace,
/// pipeline or stage name, so where a placeholder's value ends is never in doubt.
pub const PLACEHOLDER_DELIMITERS: [char; 7] = ['/', '_', '@', '=', ':', ',', '~'];

/// Why a guardrail's Vault path pattern could give two different (namespace, pipeline, stage)
/// triples the same path, or None when it cannot.
///
/// Every placeholder must stand between delimiters ([`PLACEHOLDER_DELIMITERS`], the start or
/// the end of the pattern): `{pipeline}-*` would match pipeline `fraud-v2`'s paths for pipeline
/// `fraud`, and `{namespace}-{pipeline}` reads `team` + `prod-scorer` like `team-prod` +
/// `scorer`. `{pipeline}` needs `{namespace}` in the pattern, and `{stage}` needs `{pipeline}`:
/// pipelines of the same name in two namespaces are two tenants.
pub fn ambiguous_placeholders(pattern: &str) -> Option<String> {
    let fix = "write each placeholder as a whole path segment, such as database/creds/{namespace}_{pipeline}_{stage} or kv/data/{namespace}/{pipeline}/*";
    let has = |p: &str| pattern.contains(p);
    for placeholder in ["{namespace}", "{pipeline}", "{stage}"] {
        let mut from = 0;
        while let Some(at) = pattern[from..].find(placeholder).map(|i| i + from) {
            let end = at + placeholder.len();
            let before = pattern[..at].chars().next_back();
            let after = pattern[end..].chars().next();
            let bounded = |c: Option<char>| c.is_none_or(|c| PLACEHOLDER_DELIMITERS.contains(&c));
            if !bounded(before) || !bounded(after) {
                let side = if bounded(before) { after } else { before };
                return Some(format!(
                    "{pattern:?}: {placeholder} stands next to {:?}, which can be part of a name, so two different pipelines could expand to the same path; {fix}",
                    side.unwrap_or_default()
                ));
            }
            from = end;
        }
    }
    if has("{pipeline}") && !has("{namespace}") {
        return Some(format!(
            "{pattern:?}: {{pipeline}} without {{namespace}} gives pipelines of the same name in different namespaces the same paths; add {{namespace}}"
        ));
    }
    if has("{stage}") && !has("{pipeline}") {
        return Some(format!(
            "{pattern:?}: {{stage}} without {{pipeline}} gives stages of the same name in different pipelines the same paths; add {{pipeline}}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_ceilings_are_warned_about() {
        let g: AccessGuardrail = serde_saphyr::from_str(
            r#"
apiVersion: portcullis.dev/v1alpha1
kind: AccessGuardrail
metadata: {name: wide}
spec:
  roles:
    training:
      kubernetes: [{apiGroups: [""], resources: [pods, pods/log], verbs: [get]}]
      network: {allowIngress: true}
      allowWorkloadCreation: true
    deployment:
      network: {allowIngress: true, ingressNamespaces: [web]}
"#,
        )
        .expect("test guardrail parses");
        let warnings = guardrail_warnings(&g);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].contains("pods/log"), "{}", warnings[0]);
        assert!(warnings[1].contains("from anywhere"), "{}", warnings[1]);
        assert!(
            warnings[2].contains("allowWorkloadCreation"),
            "{}",
            warnings[2]
        );
    }

    #[test]
    fn ambiguous_placeholders_are_refused() {
        for bad in [
            "database/creds/{pipeline}-*",
            "database/creds/{namespace}-{pipeline}-*",
            "kv/data/{namespace}/{pipeline}*",
            "kv/data/x{namespace}/*",
            "kv/data/{pipeline}/*",
            "kv/data/{namespace}/{stage}/*",
        ] {
            assert!(ambiguous_placeholders(bad).is_some(), "{bad}");
        }
        for good in [
            "kv/data/{namespace}/{pipeline}/{stage}/*",
            "database/creds/{namespace}_{pipeline}_{stage}",
            "database/creds/{namespace}_{pipeline}_*",
            "kv/data/{namespace}/*",
            "kv/data/shared/*",
        ] {
            assert_eq!(ambiguous_placeholders(good), None, "{good}");
        }
    }

    #[test]
    fn durations_parse_and_print_round_trip() {
        assert_eq!(parse_duration("15m"), Some(900));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("90s"), Some(90));
        for bad in ["", "15", "m", "1d", "1.5h", "-1m", "1h m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        for secs in [1, 59, 60, 61, 3600, 5400, 86399] {
            assert_eq!(parse_duration(&format_duration(secs)), Some(secs));
        }
    }

    fn pipeline(token_ttl: &str, credential_ttl: &str) -> AIPipeline {
        serde_saphyr::from_str(&format!(
            r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {{name: fraud, namespace: ml}}
spec:
  stages:
    - name: train
      role: Training
      network:
        egress:
          - cidr: 10.20.0.0/16
          - namespace: ml
        ingress:
          - fromCIDR: fd00::/8
      vault:
        tokenTTL: {token_ttl}
        policies: [{{path: kv/data/ml/*, capabilities: [read]}}]
        credentials:
          - {{name: db, path: database/creds/train, ttl: {credential_ttl}, secretName: train-db}}
"#
        ))
        .expect("test pipeline parses")
    }

    #[test]
    fn validation_keeps_what_it_parsed() {
        let valid = validate(pipeline("1h30m", "15m")).expect("valid");
        let stage = valid.stage(0);
        assert_eq!(stage.token_ttl(), Some(5400));
        let credentials: Vec<_> = stage
            .credentials()
            .map(|(c, t)| (c.name.as_str(), t))
            .collect();
        assert_eq!(credentials, [("db", 900)]);
        let egress: Vec<_> = stage.egress().map(|(_, n)| n).collect();
        assert_eq!(egress, [Some("10.20.0.0/16".parse().unwrap()), None]);
        let ingress: Vec<_> = stage.ingress().map(|(_, n)| n).collect();
        assert_eq!(ingress, [Some("fd00::/8".parse().unwrap())]);
        assert_eq!(valid.stages().len(), 1);
        // Borrowed, the same values.
        let raw = pipeline("1h30m", "15m");
        assert_eq!(
            validate(&raw).expect("valid").stage(0).token_ttl(),
            Some(5400)
        );
    }

    #[test]
    fn lifetimes_over_the_limit_are_refused_naming_field_and_limit() {
        assert!(validate(pipeline("87600h", "87600h")).is_ok());
        // Both accepted by the schema (and by validate_pipeline); too long to schedule.
        let raw = pipeline("87600h1s", "999999999999999h");
        assert!(validate_pipeline(&raw).is_empty());
        let errors = validate(raw).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.stages[0].vault.tokenTTL",
                "spec.stages[0].vault.credentials[0].ttl"
            ]
        );
        for e in &errors {
            assert!(e.message.contains("87600h"), "{e}");
        }
        // Other errors are reported with them.
        let mut raw = pipeline("1h", "999999999999999h");
        raw.spec.stages[0].name = "Train".into();
        let errors = validate(raw).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn cidrs_must_be_canonical() {
        assert!(parse_cidr("10.20.0.0/16").is_ok());
        assert!(parse_cidr("fd00::/8").is_ok());
        let err = parse_cidr("10.20.1.0/16").unwrap_err();
        assert!(err.contains("10.20.0.0/16"), "{err}");
        assert!(parse_cidr("10.20.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
    }
}
