//! What the operator has in Vault for one pipeline, kept in a Secret in the operator's own
//! namespace, `portcullis-vault-<pipeline uid>`, and cached in memory.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Work;
use crate::controller::{Error, Result};
use crate::k8s::{
    Api, ByteString, DeleteParams, FIELD_MANAGER, MANAGED_BY, ObjectMeta, Patch, PatchParams,
    Secret, is_not_found,
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
}

impl VaultState {
    pub(crate) fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.roles.is_empty() && self.leases.is_empty()
    }
}

fn secret_name(uid: &str) -> String {
    format!("portcullis-vault-{uid}")
}

impl Work<'_> {
    fn state_api(&self) -> Api<Secret> {
        Api::namespaced(self.ctx.client.clone(), &self.vault.state_namespace)
    }

    /// Caches the pipeline's state, and moves the lease gauge by the change in its lease count.
    async fn keep(&self, state: &VaultState) {
        let previous = self
            .vault
            .states
            .lock()
            .await
            .insert(self.uid.clone(), state.clone())
            .map_or(0, |s| s.leases.len());
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
        if let Some(s) = self.vault.states.lock().await.get(&self.uid) {
            return Ok(s.clone());
        }
        let state = self.read_state(&self.uid).await?;
        self.keep(&state).await;
        Ok(state)
    }

    /// Another pipeline's state (by uid): cached, or read from its Secret, not cached.
    pub(super) async fn state_of(&self, uid: &str) -> Result<VaultState> {
        if let Some(s) = self.vault.states.lock().await.get(uid) {
            return Ok(s.clone());
        }
        self.read_state(uid).await
    }

    async fn read_state(&self, uid: &str) -> Result<VaultState> {
        let secret = self.state_api().get_opt(&secret_name(uid)).await?;
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
        Ok(state)
    }

    /// Writes the pipeline's state to its Secret, then caches it.
    pub(super) async fn save(&self, state: &VaultState) -> Result<()> {
        let name = secret_name(&self.uid);
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
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "state.json".to_string(),
                ByteString(serde_json::to_vec(state).expect("state serializes")),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        let mut value = serde_json::to_value(&secret).expect("a Secret serializes");
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("Secret");
        self.state_api()
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        self.keep(state).await;
        Ok(())
    }

    /// Deletes the pipeline's state Secret and forgets its cached state.
    pub(super) async fn forget(&self) -> Result<()> {
        match self
            .state_api()
            .delete(&secret_name(&self.uid), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::Kube(e)),
        }
        self.vault.states.lock().await.remove(&self.uid);
        Ok(())
    }
}

/// A count as a gauge value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
