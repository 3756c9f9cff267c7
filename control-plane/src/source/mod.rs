//! Where the control plane learns what exists in the cluster.
//!
//! Every source produces the same thing, a [`ClusterObjects`] view made of
//! the Kubernetes API's own types (from [`kanava_cluster`]), so everything
//! downstream (translation, validation, discovery) is shared between
//! production and the lab.
//!
//! - [`kubernetes`]: watches of the Kubernetes API (production);
//! - [`manifests`]: a directory of Kubernetes manifests, watched for
//!   changes (the lab, tests, and clusters without API access).

pub mod kubernetes;
pub mod manifests;

pub use kanava_cluster::SlimObjects;
