//! Portcullis: least privilege for the stages of AI pipelines on Kubernetes.
//!
//! The pure core is [`policy`] (requested items -> decisions) and [`plan`] (decisions ->
//! Kubernetes objects and Vault configuration). The CLI and the controller share it, so what
//! `portcullis plan` prints is what the controller applies.
#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod audit;
pub mod cli;
pub mod controller;
pub mod k8s;
pub mod plan;
pub mod policy;
pub mod shard;
pub mod vault;
