//! `kanava-cni`, the chained CNI plugin that puts enrolled pods in the mesh
//! before their containers start, and `kanava-cni-install`, which places it
//! on a node.
//!
//! The container runtime runs the node's primary plugins (which give the
//! pod its interface and IP), then this one with their result as
//! `prevResult`. For a pod of an enrolled namespace ([`enrollment`]) the
//! plugin hands the pod's network namespace to the node's ztunnel over the
//! handoff socket and returns only after the ztunnel has installed the
//! capture rules and opened its listeners. If the ztunnel cannot be reached
//! or refuses, ADD fails and the runtime retries: an enrolled pod never
//! starts uncaptured. Any other pod passes through untouched.
//!
//! - [`invocation`]: the `CNI_*` environment and the configuration.
//! - [`enrollment`]: whether a pod belongs in the mesh.
//! - [`plugin`]: ADD, DEL, CHECK, VERSION, STATUS, GC.
//! - [`install`]: the installer's work on the node's CNI directories.

pub mod enrollment;
mod error;
pub mod install;
pub mod invocation;
pub mod plugin;

pub use error::{Error, code};

/// The CNI specification versions the plugin speaks. It passes the previous
/// result through unchanged, so every result format is fine.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
