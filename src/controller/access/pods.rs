//! The stages' pods' addresses, for `TokenUsedOutsidePods`: a watch of the Pods of the watched
//! namespaces that keeps, per ServiceAccount, only each pod's `status.podIPs` (nothing of the
//! spec but `serviceAccountName`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use tracing::warn;

use crate::k8s::{Api, Client, Pod, WatchStreamExt, watcher};

type PodKey = (String, String);

/// Per (namespace, ServiceAccount), the addresses of its pods.
#[derive(Debug, Default)]
pub(crate) struct PodAddresses {
    /// (namespace, ServiceAccount) -> pod name -> addresses.
    by_account: RwLock<HashMap<PodKey, HashMap<String, Vec<String>>>>,
    synced: AtomicBool,
}

impl PodAddresses {
    /// The addresses of the pods running as `service_account` in `namespace`; empty when none
    /// is known (no such pod has an address yet, or the watch has not listed them yet).
    pub(crate) fn of(&self, namespace: &str, service_account: &str) -> Vec<String> {
        if !self.synced.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.by_account
            .read()
            .expect("pod addresses lock")
            .get(&(namespace.to_string(), service_account.to_string()))
            .map(|pods| pods.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn apply(map: &mut HashMap<PodKey, HashMap<String, Vec<String>>>, pod: &Pod) {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            return;
        };
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let ips: Vec<String> = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
            .unwrap_or_default();
        Self::remove(map, ns, name);
        if !ips.is_empty() {
            map.entry((ns.clone(), account))
                .or_default()
                .insert(name.clone(), ips);
        }
    }

    fn remove(map: &mut HashMap<PodKey, HashMap<String, Vec<String>>>, ns: &str, name: &str) {
        map.retain(|(n, _), pods| {
            if n == ns {
                pods.remove(name);
            }
            !pods.is_empty()
        });
    }

    /// Follows the Pods of `api` for ever.
    pub(crate) async fn watch(self: Arc<Self>, api: Api<Pod>) {
        let mut relist: Option<HashMap<PodKey, HashMap<String, Vec<String>>>> = None;
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some(map) = relist.as_mut() {
                        Self::apply(map, &pod);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(map) = relist.take() {
                        *self.by_account.write().expect("pod addresses lock") = map;
                    }
                    self.synced.store(true, Ordering::Release);
                }
                Ok(watcher::Event::Apply(pod)) => {
                    Self::apply(
                        &mut self.by_account.write().expect("pod addresses lock"),
                        &pod,
                    );
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) {
                        Self::remove(
                            &mut self.by_account.write().expect("pod addresses lock"),
                            ns,
                            name,
                        );
                    }
                }
                Err(error) => {
                    warn!(%error, "watching the stages' pods failed; TokenUsedOutsidePods is not checked until it works again");
                }
            }
        }
    }

    /// Starts following the Pods of `namespace` (every namespace when none).
    pub(crate) fn start(client: &Client, namespace: Option<&str>) -> Arc<PodAddresses> {
        let this = Arc::new(PodAddresses::default());
        let api = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        tokio::spawn(this.clone().watch(api));
        this
    }
}
