//! Which cluster and namespace a command talks to, chosen the way kubectl chooses them:
//! `--kubeconfig`, else every file of `KUBECONFIG` merged (the first file to set a value wins),
//! else `~/.kube/config`, else the in-cluster configuration; `--context` picks a context other
//! than the current one; `-n` overrides the context's namespace, which is the default.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The kubeconfig flags every command that reads a cluster shares.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeArgs {
    /// The kubeconfig file to use (default: the files of KUBECONFIG, merged, else
    /// ~/.kube/config, else the in-cluster configuration).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
}

impl KubeArgs {
    fn options(&self) -> KubeConfigOptions {
        KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        }
    }

    /// The kubeconfig these flags name, merged from every file of `KUBECONFIG`; `None` when
    /// there is none (as in a pod).
    fn read(&self) -> Result<Option<Kubeconfig>, String> {
        match &self.kubeconfig {
            Some(path) => Kubeconfig::read_from(path)
                .map(Some)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display())),
            None => match Kubeconfig::from_env() {
                Ok(Some(config)) => Ok(Some(config)),
                Ok(None) => {
                    let home = std::env::var_os("HOME").map(PathBuf::from);
                    match home.map(|h| h.join(".kube/config")).filter(|p| p.exists()) {
                        Some(path) => Kubeconfig::read_from(&path)
                            .map(Some)
                            .map_err(|e| format!("{}: {e}", path.display())),
                        None => Ok(None),
                    }
                }
                Err(e) => Err(format!("KUBECONFIG: {e}")),
            },
        }
    }

    /// The namespace of the chosen context, as kubectl uses it when `-n` is not given: `None`
    /// when the context sets none (kubectl then uses `default`).
    pub(crate) fn context_namespace(&self) -> Result<Option<String>, String> {
        let Some(config) = self.read()? else {
            return match &self.context {
                Some(context) => Err(format!(
                    "--context {context}: there is no kubeconfig; set KUBECONFIG or --kubeconfig"
                )),
                None => Ok(None),
            };
        };
        let Some(name) = self.context.clone().or(config.current_context.clone()) else {
            return Ok(None);
        };
        let context = config
            .contexts
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = config.contexts.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "the kubeconfig has no context {name:?}; its contexts are {known:?} (`kubectl config get-contexts`)"
                )
            })?;
        Ok(context.context.as_ref().and_then(|c| c.namespace.clone()))
    }

    /// A client for the chosen cluster, and the namespace of the chosen context (`default` when
    /// it sets none; the ServiceAccount's namespace in a pod).
    pub(crate) async fn client(&self) -> Result<(kube::Client, String), String> {
        // Names an unknown context, and lists the known ones, before kube's own error would.
        self.context_namespace()?;
        let config = match self.read()? {
            Some(kubeconfig) => kube::Config::from_custom_kubeconfig(kubeconfig, &self.options())
                .await
                .map_err(|e| match &self.context {
                    Some(context) => format!("--context {context}: {e}"),
                    None => format!("kubeconfig: {e}"),
                })?,
            None if self.context.is_some() => {
                return Err(format!(
                    "--context {}: there is no kubeconfig; set KUBECONFIG or --kubeconfig",
                    self.context.as_deref().unwrap_or_default()
                ));
            }
            None => kube::Config::incluster().map_err(|e| {
                format!("no kubeconfig (KUBECONFIG, ~/.kube/config) and not in a pod: {e}")
            })?,
        };
        let namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        Ok((client, namespace))
    }
}
