//! Kanava's wire API, generated from `kanava/v1/*.proto`.
//!
//! - [`v1::discovery_server`] / [`v1::discovery_client`]: the xDS-like stream
//!   that tells ztunnels which workloads and services exist.
//! - [`v1::certificates_server`] / [`v1::certificates_client`]: the mesh CA.
//! - [`v1::HandoffRequest`] / [`v1::HandoffReply`]: the node-local protocol
//!   that hands a pod's network namespace to the ztunnel.

/// Version 1 of the API (`package kanava.v1`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kanava.v1");
}
