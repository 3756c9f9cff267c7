//! The cluster as Kanava reads it, and what it means for the mesh.
//!
//! ```text
//!  Kubernetes API  ─┐
//!  (control plane)  ├─► ClusterObjects ──slim──► SlimObjects ──translate──► MeshState
//!  manifest files  ─┘   (k8s-openapi types)      (pods as MeshPod)          (workloads, services, policies)
//!  (lab, tests)
//! ```
//!
//! - [`objects`]: [`ClusterObjects`], a view of the Namespaces, Pods,
//!   Services and AuthorizationPolicies that exist, in the Kubernetes API's
//!   own types, or with pods as [`MeshPod`]s ([`SlimObjects`]);
//! - [`manifests`]: reading them from YAML or JSON manifests;
//! - [`crd`]: the `AuthorizationPolicy` custom resource;
//! - [`slim`]: objects cut down to what the mesh reads of them, as the
//!   control plane keeps them and the translation reads them;
//! - [`translate`]: objects → the mesh model of [`kanava_mesh`], validated.
//!
//! Every source of objects (the control plane's Kubernetes watches and
//! manifest directory, the lab, the benchmarks) goes through this one crate,
//! so all of them produce the same mesh from the same objects.

pub mod crd;
pub mod manifests;
pub mod objects;
pub mod slim;
pub mod translate;

pub use manifests::{ManifestDirError, ManifestError, Other, parse_manifests, read_manifest_dir};
pub use objects::{
    ClusterObjects, Kind, Object, ObjectId, ObjectKey, ObjectOf, PodForm, SlimObject, SlimObjects,
};
pub use slim::MeshPod;
pub use translate::{MeshState, PolicyVerdict, TranslateConfig, Translator};
