//! What the operator has in Vault for one pipeline, kept in a Secret in the operator's own
//! namespace, `portcullis-vault-<pipeline uid>`, and cached in memory.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use tracing::warn;

use super::Work;
use crate::controller::{Error, Result};
use crate::k8s::{
    Api, ByteString, DeleteParams, MANAGED_BY, ObjectMeta, Patch, PatchParams, PostParams,
    Preconditions, ResourceExt, Secret, is_not_found,
};
use crate::vault::leases::LeaseRecord;

/// What the operator has in Vault for one pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VaultState {
    #[serde(default)]
    pub policies: BTreeSet<String>,
    #[serde(default)]
    pub roles: BTreeSet<String>,
    #[serde(default)]
    pub leases: Vec<LeaseRecord>,
    /// The last value of the `portcullis.dev/rotate-now` annotation acted on: each value
    /// rotates the credentials once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_for: Option<String>,
}

impl VaultState {
    pub(crate) fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.roles.is_empty() && self.leases.is_empty()
    }
}

/// A pipeline's state as last read or written, with the state Secret's `resourceVersion` then
/// (`None`: there was no Secret). The next write is made on that version only: a writer whose
/// copy is stale (an old leader still running) fails instead of overwriting a newer state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Kept {
    pub state: VaultState,
    resource_version: Option<String>,
}

/// Whether a Kubernetes API error is a 409: the object changed (or appeared) since it was read.
fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 409)
}

fn secret_name(uid: &str) -> String {
    format!("portcullis-vault-{uid}")
}

impl Work<'_> {
    fn state_api(&self) -> Api<Secret> {
        Api::namespaced(self.ctx.client.clone(), &self.vault.state_namespace)
    }

    /// Caches the pipeline's state, and moves the lease gauge by the change in its lease count.
    async fn keep(&self, state: &VaultState, resource_version: Option<String>) {
        let previous = self
            .vault
            .states
            .lock()
            .await
            .insert(
                self.uid.clone(),
                Kept {
                    state: state.clone(),
                    resource_version,
                },
            )
            .map_or(0, |k| k.state.leases.len());
        self.ctx
            .metrics
            .observe_leases(&self.uid, &self.namespace, &self.name, &state.leases);
        self.ctx
            .metrics
            .credential_leases
            .inc_by(gauge(state.leases.len()) - gauge(previous));
    }

    /// The pipeline's state: cached, or read from its Secret (empty when there is none).
    pub(super) async fn load(&self) -> Result<VaultState> {
        if let Some(k) = self.vault.states.lock().await.get(&self.uid) {
            return Ok(k.state.clone());
        }
        let (state, resource_version) = self.read_state(&self.uid).await?;
        self.keep(&state, resource_version).await;
        Ok(state)
    }

    /// Whether the pipeline's state Secret existed when its state was last read or written.
    pub(super) async fn has_state_secret(&self) -> bool {
        self.vault
            .states
            .lock()
            .await
            .get(&self.uid)
            .is_some_and(|k| k.resource_version.is_some())
    }

    /// Another pipeline's state (by uid): cached, or read from its Secret, not cached.
    pub(super) async fn state_of(&self, uid: &str) -> Result<VaultState> {
        if let Some(k) = self.vault.states.lock().await.get(uid) {
            return Ok(k.state.clone());
        }
        Ok(self.read_state(uid).await?.0)
    }

    /// A pipeline's state from its Secret, and the Secret's `resourceVersion`.
    async fn read_state(&self, uid: &str) -> Result<(VaultState, Option<String>)> {
        let secret = self.state_api().get_opt(&secret_name(uid)).await?;
        let resource_version = secret.as_ref().and_then(ResourceExt::resource_version);
        let state = match secret
            .and_then(|s| s.data)
            .and_then(|d| d.get("state.json").cloned())
        {
            Some(bytes) => {
                serde_json::from_slice(&bytes.0).map_err(|source| Error::VaultState {
                    secret: secret_name(uid),
                    source,
                })?
            }
            None => VaultState::default(),
        };
        Ok((state, resource_version))
    }

    /// Forgets the cached state after a write was refused because the Secret changed since it
    /// was read: the next reconcile reads it again and plans from what is there.
    async fn stale(&self, e: kube::Error) -> Error {
        if is_conflict(&e) {
            warn!(pipeline = %self.name, namespace = %self.namespace, secret = %secret_name(&self.uid), "the pipeline's Vault state Secret changed since it was read (another writer, such as a newer leader); not overwriting it, reading it again");
            self.ctx.metrics.vault_state_conflicts.inc();
        }
        if let Some(k) = self.vault.states.lock().await.remove(&self.uid) {
            self.ctx
                .metrics
                .credential_leases
                .dec_by(gauge(k.state.leases.len()));
        }
        Error::Kube(e)
    }

    /// Writes the pipeline's state to its Secret, on the version last read or written (created
    /// when there was none), then caches it. When the Secret changed in between, nothing is
    /// written, the cached state is dropped, and the error is returned: the reconcile ends and
    /// the next one starts from the state that is there.
    pub(super) async fn save(&self, state: &VaultState) -> Result<()> {
        let name = secret_name(&self.uid);
        let resource_version = match self.vault.states.lock().await.get(&self.uid) {
            Some(k) => k.resource_version.clone(),
            None => self.read_state(&self.uid).await?.1,
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                    (
                        "app.kubernetes.io/component".to_string(),
                        "vault-state".to_string(),
                    ),
                ])),
                annotations: Some(BTreeMap::from([(
                    "portcullis.dev/pipeline".to_string(),
                    format!("{}/{}", self.namespace, self.name),
                )])),
                resource_version: resource_version.clone(),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "state.json".to_string(),
                ByteString(serde_json::to_vec(state).expect("state serializes")),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        let api = self.state_api();
        // A merge patch that carries metadata.resourceVersion is refused with 409 when the
        // Secret changed since: the same precondition as a PUT, with the patch verb the
        // operator already has (it has no update on Secrets).
        let written = match resource_version {
            Some(_) => {
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&secret))
                    .await
            }
            None => api.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(written) => {
                self.keep(state, written.resource_version()).await;
                Ok(())
            }
            Err(e) => Err(self.stale(e).await),
        }
    }

    /// Deletes the pipeline's state Secret (the version last read or written) and forgets its
    /// cached state.
    pub(super) async fn forget(&self) -> Result<()> {
        let resource_version = self
            .vault
            .states
            .lock()
            .await
            .get(&self.uid)
            .and_then(|k| k.resource_version.clone());
        let params = DeleteParams {
            preconditions: resource_version.map(|rv| Preconditions {
                resource_version: Some(rv),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match self
            .state_api()
            .delete(&secret_name(&self.uid), &params)
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(self.stale(e).await),
        }
        if let Some(k) = self.vault.states.lock().await.remove(&self.uid) {
            self.ctx
                .metrics
                .credential_leases
                .dec_by(gauge(k.state.leases.len()));
        }
        Ok(())
    }
}

/// A count as a gauge value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
