//! The operator's Vault token, kept in a Secret in its own namespace: the controller's
//! [`TokenStore`] for the Vault session.

use serde_json::json;

use crate::k8s::{Api, Client, FIELD_MANAGER, KubeError, MANAGED_BY, Patch, PatchParams, Secret};
use crate::vault::{TokenStore, TokenStoreError};

/// The Secret the operator's Vault token is kept in, in its own namespace (with more than one
/// shard, each shard's name has the shard's suffix: `portcullis-vault-token-shard-0-of-2`).
pub(crate) const TOKEN_SECRET: &str = "portcullis-vault-token";

/// Keeps the token in Secret `name` (normally [`TOKEN_SECRET`]) of `namespace`.
pub(crate) struct SecretTokenStore {
    client: Client,
    namespace: String,
    name: String,
}

impl SecretTokenStore {
    pub(crate) fn new(client: Client, namespace: &str, name: &str) -> SecretTokenStore {
        SecretTokenStore {
            client,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn api(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn failed(&self, doing: &str, source: KubeError) -> TokenStoreError {
        TokenStoreError {
            action: format!(
                "Kubernetes API: {doing} Secret {}/{}",
                self.namespace, self.name
            ),
            source: Box::new(source),
        }
    }
}

impl TokenStore for SecretTokenStore {
    async fn load(&self) -> Result<Option<String>, TokenStoreError> {
        let secret = self
            .api()
            .get_opt(&self.name)
            .await
            .map_err(|e| self.failed("reading", e))?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|d| d.get("token").cloned())
            .and_then(|b| String::from_utf8(b.0).ok()))
    }

    async fn save(&self, token: &str) -> Result<(), TokenStoreError> {
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "labels": {MANAGED_BY.0: MANAGED_BY.1},
            },
            "type": "Opaque",
            "stringData": {"token": token},
        });
        self.api()
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|e| self.failed("writing", e))?;
        Ok(())
    }
}
