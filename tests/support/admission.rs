//! Real ValidatingAdmissionPolicies, as a way to make the API server refuse a write the operator
//! makes: the faults a real server can be asked for.

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::fixture::WAIT;
use super::helpers::wait_for;

/// A policy and its binding (named `refuse-<resource>-<ns>`) that refuse UPDATEs of `resource` (in API group `group`) in
/// namespace `ns` for which the CEL `refuse_when` holds, with `message`. Removed by
/// [`Refusal::lift`].
pub(crate) struct Refusal {
    client: Client,
    name: String,
}

impl Refusal {
    /// Creates the policy and binding, and waits until the API server applies them: until a
    /// dry-run change of `probe` (an object the policy covers) is refused.
    pub(crate) async fn install<K>(
        client: &Client,
        (group, resource): (&str, &str),
        ns: &str,
        refuse_when: &str,
        message: &str,
        probe: &Api<K>,
        probe_name: &str,
    ) -> Refusal
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let name = &format!("refuse-{resource}-{ns}");
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [group], "apiVersions": ["*"],
                    "operations": ["UPDATE"], "resources": [resource],
                }]},
                "validations": [{"expression": format!("!({refuse_when})"), "message": message}],
            },
        }))
        .expect("a policy");
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
            },
        }))
        .expect("a binding");
        Api::<ValidatingAdmissionPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .expect("policy created");
        Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .expect("binding created");
        let params = PatchParams {
            dry_run: true,
            ..PatchParams::default()
        };
        let patch: Value = json!({"metadata": {"annotations": {"portcullis.test/probe": "x"}}});
        wait_for("the API server to apply the policy", WAIT, || {
            let (probe, params, patch) = (probe.clone(), params.clone(), patch.clone());
            async move {
                probe
                    .patch(probe_name, &params, &Patch::Merge(&patch))
                    .await
                    .is_err()
                    .then_some(())
            }
        })
        .await;
        Refusal {
            client: client.clone(),
            name: name.to_string(),
        }
    }

    /// Removes the policy and its binding.
    pub(crate) async fn lift(self) {
        let _ = Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
        let _ = Api::<ValidatingAdmissionPolicy>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}
