//! The credential Secrets in the pipeline's namespace: written with the data Vault returned,
//! annotated with their lease, never taken over from someone else, and deleted when their
//! credential is no longer requested.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::{VaultProblem, VaultSide, Work, rfc3339};
use crate::audit::Action as AuditAction;
use crate::controller::{Error, Result};
use crate::k8s::{
    Api, ByteString, DeleteParams, FIELD_MANAGER, MANAGED_BY, ObjectMeta, ObjectRef,
    OwnerReference, PIPELINE_LABEL, Patch, PatchParams, ResourceExt, STAGE_LABEL, Secret,
    is_not_found, merge_patch_if_present,
};
use crate::plan::CredentialRequest;
use crate::vault::leases::{self, Delivery, LeaseRecord};

/// The annotation that names the lease a credential Secret holds (a [`leases::lease_hash`]).
const LEASE_HASH: &str = "portcullis.dev/lease-hash";

/// What the pipeline's credential Secrets hold: Secret name → the lease hash it carries
/// (`None`: missing, or not the pipeline's).
pub(super) type Held = HashMap<String, Option<String>>;

fn api(work: &Work<'_>) -> Api<Secret> {
    Api::namespaced(work.ctx.client.clone(), &work.namespace)
}

/// The lease hash the pipeline's Secret `name` carries, as the cache has it (`None`: not in the
/// cache, or not the pipeline's; an empty hash: no annotation).
fn cached_hash(work: &Work<'_>, name: &str) -> Option<String> {
    let secret = work
        .vault
        .secrets
        .get(&ObjectRef::new(name).within(&work.namespace))?;
    secret
        .owner_references()
        .iter()
        .any(|o| o.uid == work.uid)
        .then(|| {
            secret
                .annotations()
                .get(LEASE_HASH)
                .cloned()
                .unwrap_or_default()
        })
}

/// What each requested credential's Secret holds, as the cache has it.
pub(super) fn held(work: &Work<'_>, side: &VaultSide) -> Held {
    side.vault
        .credentials
        .iter()
        .map(|r| (r.secret_name.clone(), cached_hash(work, &r.secret_name)))
        .collect()
}

/// What the Secret `name` holds, read from the API server: the cache may lag behind the
/// operator's own writes, so a mismatch is confirmed before it is repaired.
pub(super) async fn confirm(work: &Work<'_>, name: &str) -> Result<Option<String>> {
    let Some(secret) = api(work).get_metadata_opt(name).await? else {
        return Ok(None);
    };
    Ok(secret
        .owner_references()
        .iter()
        .any(|o| o.uid == work.uid)
        .then(|| {
            secret
                .annotations()
                .get(LEASE_HASH)
                .cloned()
                .unwrap_or_default()
        }))
}

/// Whether the Secret `name` holds the lease `lease_id`'s credentials.
pub(super) fn delivery(held: &Held, name: &str, lease_id: &str) -> Delivery {
    match held.get(name) {
        None | Some(None) => Delivery::Missing,
        Some(Some(hash)) if *hash == leases::lease_hash(lease_id) => Delivery::Current,
        Some(Some(_)) => Delivery::Stale,
    }
}

/// Before issuing into `r`'s Secret: a Secret of that name that is not the pipeline's is
/// recorded as a refused adoption and stops the Vault step ([`VaultProblem::SecretNotOwned`]).
pub(super) async fn refuse_foreign(
    work: &Work<'_>,
    side: &VaultSide,
    r: &CredentialRequest,
    credential: &str,
) -> Result<()> {
    if cached_hash(work, &r.secret_name).is_some() {
        return Ok(());
    }
    let Some(existing) = api(work).get_metadata_opt(&r.secret_name).await? else {
        return Ok(());
    };
    if existing
        .owner_references()
        .iter()
        .any(|o| o.uid == work.uid)
    {
        return Ok(());
    }
    let problem = VaultProblem::SecretNotOwned {
        namespace: work.namespace.clone(),
        name: r.secret_name.clone(),
        credential: credential.to_string(),
    };
    let mut e = work.entry(
        AuditAction::AdoptionRefused,
        Some(&r.stage),
        format!("Secret {}/{}", work.namespace, r.secret_name),
        problem.to_string(),
    );
    e.subject = side.subject(&r.stage);
    work.record(e).await?;
    Err(Error::Vault(problem))
}

/// Writes the credential Secret: the data keys of Vault's response (strings as they are, other
/// values as JSON), and annotations with the lease's expiry and hash. Without `data`, only the
/// annotations change (a renewal).
pub(super) async fn write(
    work: &Work<'_>,
    r: &CredentialRequest,
    lease: &LeaseRecord,
    data: Option<&serde_json::Map<String, Value>>,
    owner: &OwnerReference,
) -> Result<()> {
    let api = api(work);
    let annotations = BTreeMap::from([
        (
            "portcullis.dev/lease-expires-at".to_string(),
            rfc3339(lease.expires_at),
        ),
        (LEASE_HASH.to_string(), leases::lease_hash(&lease.lease_id)),
        (
            "portcullis.dev/issued-at".to_string(),
            rfc3339(lease.issued_at),
        ),
        ("portcullis.dev/source-path".to_string(), r.path.clone()),
    ]);
    let Some(data) = data else {
        let patch = json!({"metadata": {"annotations": annotations}});
        return merge_patch_if_present(&api, &r.secret_name, &patch)
            .await
            .map_err(Error::Kube);
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(r.secret_name.clone()),
            namespace: Some(work.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (PIPELINE_LABEL.to_string(), work.name.clone()),
                (STAGE_LABEL.to_string(), r.stage.clone()),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| {
                    let bytes = match v {
                        Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    (k.clone(), ByteString(bytes))
                })
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let mut value = serde_json::to_value(&secret).expect("a Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    api.patch(
        &r.secret_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(())
}

/// Records, then deletes the pipeline's Secrets whose credential is no longer requested.
pub(super) async fn prune(work: &Work<'_>, side: &VaultSide) -> Result<()> {
    let api = api(work);
    for secret in work.vault.secrets.state() {
        let ours = secret.namespace().as_deref() == Some(work.namespace.as_str())
            && secret.owner_references().iter().any(|o| o.uid == work.uid)
            && secret.labels().get(PIPELINE_LABEL) == Some(&work.name);
        let requested = side
            .vault
            .credentials
            .iter()
            .any(|r| r.secret_name == secret.name_any());
        if !ours || requested {
            continue;
        }
        let object = format!("Secret {}/{}", work.namespace, secret.name_any());
        work.record(work.entry(
            AuditAction::Prune,
            secret.labels().get(STAGE_LABEL).map(String::as_str),
            object.clone(),
            format!("deleting {object}: its credential is no longer requested"),
        ))
        .await?;
        match api
            .delete(&secret.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::Kube(e)),
        }
    }
    Ok(())
}
