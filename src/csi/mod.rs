//! The Kubernetes CSI driver: identity, controller and node services.

/// Generated from `proto/csi.proto` (package `csi.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

pub mod attachments;
pub mod authority;
pub mod common;
pub mod controller;
pub mod flush;
pub mod identity;
pub mod memory;
pub mod mount;
pub mod node;
pub mod registration;
pub mod server;
