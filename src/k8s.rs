//! The one gateway to `kube` and `k8s_openapi` for the operator's I/O side (`controller`): the
//! types it uses are imported from here, so an upgrade of either crate touches one place first.
//! The pure core (`api`, `policy`, `plan`) builds Kubernetes objects and imports their types
//! itself.
//!
//! It also holds what every writer to the cluster must agree on: the field manager, the labels
//! of managed objects, a namespace's labels as selectors see them, and the kinds Portcullis
//! manages.
//!
//! # Adding a managed kind
//!
//! [`ManagedKind::of`] matches [`crate::plan::Object`] exhaustively, so a new kind of planned
//! object does not compile until it has a [`ManagedKind`]. `controller::apply` maps each
//! `ManagedKind` to its type with an exhaustive match (no `_` arm); the index of managed objects
//! (`controller::index`) has a `PerKind` struct with one field per kind, which must list the new
//! kind for pruning (`PerKind::KINDS`) and is built and destructured exhaustively where
//! `controller::run` watches the kinds and waits for them: the new kind does not compile until
//! it is applied, pruned and watched.

use std::collections::BTreeMap;

pub use k8s_openapi::ByteString;
pub use k8s_openapi::NamespaceResourceScope;
pub use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, ValidatingWebhookConfiguration,
};
pub use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
pub use k8s_openapi::api::coordination::v1::Lease;
pub use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, Secret, ServiceAccount};
pub use k8s_openapi::api::networking::v1::NetworkPolicy;
pub use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, ObjectMeta, OwnerReference, Time,
};
pub use k8s_openapi::jiff::Timestamp;
pub use kube::api::{
    ApiResource, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams, PostParams,
    Preconditions,
};
pub use kube::runtime::controller::{Action, Config as ControllerConfig, Error as ControllerError};
pub use kube::runtime::events::{Event, EventType, Recorder, Reporter};
pub use kube::runtime::reflector::{ObjectRef, Store};
pub use kube::runtime::{Controller, WatchStreamExt, predicates, reflector, watcher};
pub use kube::{Api, Client, Error as KubeError, Resource, ResourceExt};

/// A Kubernetes API call's result.
pub type KubeResult<T> = Result<T, KubeError>;

/// The field manager of every write Portcullis makes.
pub const FIELD_MANAGER: &str = "portcullis";

/// The labels every object Portcullis writes carries. The plan sets them on the objects it
/// builds; they are defined there, once, because the plan is pure and cannot depend on this
/// module's I/O types.
pub use crate::plan::names::{MANAGED_BY, PIPELINE_LABEL, STAGE_LABEL};

/// The label Kubernetes sets on every namespace (since 1.21) to its own name.
pub const METADATA_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespace's labels as selectors see them: its own, from the metadata cache, plus
/// `kubernetes.io/metadata.name` (which clusters before 1.21 do not set).
pub fn namespace_labels(
    namespaces: &Store<PartialObjectMeta<Namespace>>,
    namespace: &str,
) -> BTreeMap<String, String> {
    let labels = namespaces
        .get(&ObjectRef::new(namespace))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    with_name_label(labels, namespace)
}

/// `labels` of `namespace` with `kubernetes.io/metadata.name` set to its name, as the API server
/// sets it: the one place that label is added (pure, for the planner and the CLI too).
pub fn with_name_label(
    mut labels: BTreeMap<String, String>,
    namespace: &str,
) -> BTreeMap<String, String> {
    labels.insert(METADATA_NAME_LABEL.into(), namespace.into());
    labels
}

/// A kind of object Portcullis applies, prunes and watches in the pipelines' namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ManagedKind {
    ServiceAccount,
    Role,
    RoleBinding,
    NetworkPolicy,
}

impl ManagedKind {
    /// The kind of a planned object.
    pub fn of(object: &crate::plan::Object) -> ManagedKind {
        use crate::plan::Object;
        match object {
            Object::ServiceAccount(_) => ManagedKind::ServiceAccount,
            Object::Role(_) => ManagedKind::Role,
            Object::RoleBinding(_) => ManagedKind::RoleBinding,
            Object::NetworkPolicy(_) => ManagedKind::NetworkPolicy,
        }
    }

    /// The Kubernetes kind, as in `kind:` (and in the metrics' `kind` label).
    pub fn as_str(self) -> &'static str {
        match self {
            ManagedKind::ServiceAccount => <ServiceAccount as k8s_openapi::Resource>::KIND,
            ManagedKind::Role => <Role as k8s_openapi::Resource>::KIND,
            ManagedKind::RoleBinding => <RoleBinding as k8s_openapi::Resource>::KIND,
            ManagedKind::NetworkPolicy => <NetworkPolicy as k8s_openapi::Resource>::KIND,
        }
    }
}

impl std::fmt::Display for ManagedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Kubernetes type Portcullis manages, with its [`ManagedKind`].
pub trait Managed:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: ManagedKind;
}

impl Managed for ServiceAccount {
    const KIND: ManagedKind = ManagedKind::ServiceAccount;
}
impl Managed for Role {
    const KIND: ManagedKind = ManagedKind::Role;
}
impl Managed for RoleBinding {
    const KIND: ManagedKind = ManagedKind::RoleBinding;
}
impl Managed for NetworkPolicy {
    const KIND: ManagedKind = ManagedKind::NetworkPolicy;
}

/// Whether a Kubernetes API error is a 404 (the object is already gone).
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 404)
}

/// A JSON merge patch of `name`; an object that is already gone is not an error (there is
/// nothing left to change on it).
pub async fn merge_patch_if_present<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The current time as Kubernetes writes it.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// The annotation `kubectl apply` writes: a copy of the whole object, never read here.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Keeps of a cached object's metadata only what the reconciles read: its identity (name,
/// namespace, uid, resourceVersion), deletion, Portcullis's labels, and its owner references to
/// AIPipelines (whole, as the controller maps owned objects to their pipeline by them). Managed
/// fields, annotations and everyone else's labels and owners go: they are most of the bytes of
/// an object's metadata, and the caches hold every object of the managed kinds.
pub fn trim_cached_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.finalizers = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|key, _| key.starts_with("portcullis.dev/") || key == MANAGED_BY.0);
    }
    if let Some(owners) = meta.owner_references.as_mut() {
        owners.retain(|o| o.kind == "AIPipeline" && o.api_version.starts_with("portcullis.dev/"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_planned_object_has_its_managed_kind() {
        use crate::plan::Object;
        for object in [
            Object::ServiceAccount(ServiceAccount::default()),
            Object::Role(Role::default()),
            Object::RoleBinding(RoleBinding::default()),
            Object::NetworkPolicy(NetworkPolicy::default()),
        ] {
            assert_eq!(ManagedKind::of(&object).as_str(), object.kind());
        }
    }

    #[test]
    fn kind_names_are_the_kubernetes_kinds() {
        assert_eq!(ManagedKind::ServiceAccount.as_str(), "ServiceAccount");
        assert_eq!(ManagedKind::Role.as_str(), "Role");
        assert_eq!(ManagedKind::RoleBinding.as_str(), "RoleBinding");
        assert_eq!(ManagedKind::NetworkPolicy.as_str(), "NetworkPolicy");
    }
}
