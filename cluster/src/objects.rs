//! The cluster objects the mesh reads, as the Kubernetes API returns them
//! or, for pods, as the mesh reads them ([`MeshPod`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};

use crate::crd::AuthorizationPolicy;
use crate::slim::{self, MeshPod};

/// `namespace/name` of a namespaced object.
pub type ObjectKey = (String, String);

/// The cluster objects the mesh cares about. Objects are shared, so a new
/// view of a large cluster costs little more than its map.
///
/// Pods come in two forms: `Arc<Pod>`, as the API server returns them (the
/// lab, which writes them back), and `Arc<MeshPod>` ([`SlimObjects`]),
/// what the translation reads and a control plane holds of 100,000 pods.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterObjects<P = Arc<Pod>> {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<ObjectKey, P>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub policies: BTreeMap<ObjectKey, Arc<AuthorizationPolicy>>,
}

/// The cluster as the translation reads it: pods as [`MeshPod`]s.
pub type SlimObjects = ClusterObjects<Arc<MeshPod>>;

impl<P> Default for ClusterObjects<P> {
    fn default() -> Self {
        ClusterObjects {
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            policies: BTreeMap::new(),
        }
    }
}

/// A form a pod is held in.
pub trait PodForm: Clone + fmt::Debug + PartialEq {
    /// `namespace/name`.
    fn key(&self) -> ObjectKey;

    /// `metadata.resourceVersion`.
    fn resource_version(&self) -> Option<&str>;

    /// Shares what this pod has in common with `neighbour`, the pod next to
    /// it in name order (a sibling of the same ReplicaSet, usually). Only a
    /// pod held nowhere else changes: one that is would be copied.
    fn share_with(&mut self, _neighbour: &Self) {}
}

impl PodForm for Arc<Pod> {
    fn key(&self) -> ObjectKey {
        key_of(&self.metadata)
    }

    fn resource_version(&self) -> Option<&str> {
        self.metadata.resource_version.as_deref()
    }
}

impl PodForm for Arc<MeshPod> {
    fn key(&self) -> ObjectKey {
        (self.namespace.clone(), self.name.clone())
    }

    fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// The pods of one ReplicaSet carry the same labels, and their names
    /// sort together: one label map serves them all.
    fn share_with(&mut self, neighbour: &Self) {
        if let Some(pod) = Arc::get_mut(self)
            && pod.labels == neighbour.labels
            && !Arc::ptr_eq(&pod.labels, &neighbour.labels)
        {
            pod.labels = neighbour.labels.clone();
        }
    }
}

/// The kinds of object the mesh reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    AuthorizationPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object's kind and `namespace/name` (namespace empty for Namespaces).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub kind: Kind,
    pub key: ObjectKey,
}

/// One cluster object, its pod (if it is one) in the form `P`.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectOf<P> {
    Namespace(Arc<Namespace>),
    Pod(P),
    Service(Arc<Service>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
}

/// One object read from a manifest, as it was written.
pub type Object = ObjectOf<Arc<Pod>>;

/// One object as a control plane keeps it (see [`Object::slimmed`]).
pub type SlimObject = ObjectOf<Arc<MeshPod>>;

impl<P: PodForm> ObjectOf<P> {
    pub fn id(&self) -> ObjectId {
        let key = match self {
            ObjectOf::Namespace(o) => (String::new(), o.metadata.name.clone().unwrap_or_default()),
            ObjectOf::Pod(o) => o.key(),
            ObjectOf::Service(o) => key_of(&o.metadata),
            ObjectOf::AuthorizationPolicy(o) => key_of(&o.metadata),
        };
        ObjectId {
            kind: self.kind(),
            key,
        }
    }

    /// `metadata.resourceVersion`, as written.
    pub fn resource_version(&self) -> Option<&str> {
        match self {
            ObjectOf::Namespace(o) => o.metadata.resource_version.as_deref(),
            ObjectOf::Pod(o) => o.resource_version(),
            ObjectOf::Service(o) => o.metadata.resource_version.as_deref(),
            ObjectOf::AuthorizationPolicy(o) => o.metadata.resource_version.as_deref(),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            ObjectOf::Namespace(_) => Kind::Namespace,
            ObjectOf::Pod(_) => Kind::Pod,
            ObjectOf::Service(_) => Kind::Service,
            ObjectOf::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub fn describe(&self) -> String {
        let unnamed = |name: &str| {
            if name.is_empty() {
                "<unnamed>".to_string()
            } else {
                name.to_string()
            }
        };
        match self {
            ObjectOf::Namespace(o) => format!(
                "Namespace {}",
                unnamed(o.metadata.name.as_deref().unwrap_or_default())
            ),
            _ => {
                let (namespace, name) = self.id().key;
                format!("{} {namespace}/{}", self.kind(), unnamed(&name))
            }
        }
    }
}

impl Object {
    /// This object with only what the mesh reads of it.
    pub fn slimmed(self) -> SlimObject {
        match self {
            Object::Namespace(o) => {
                SlimObject::Namespace(slim::namespace(Arc::unwrap_or_clone(o)).into())
            }
            Object::Pod(o) => SlimObject::Pod(Arc::new(MeshPod::from(Arc::unwrap_or_clone(o)))),
            Object::Service(o) => {
                SlimObject::Service(slim::service(Arc::unwrap_or_clone(o)).into())
            }
            Object::AuthorizationPolicy(o) => {
                SlimObject::AuthorizationPolicy(slim::policy(Arc::unwrap_or_clone(o)).into())
            }
        }
    }
}

impl<P: PodForm> ClusterObjects<P> {
    /// Adds or replaces an object. Returns the description of the object it
    /// replaced, if any.
    pub fn insert(&mut self, object: ObjectOf<P>) -> Option<String> {
        let describe = object.describe();
        let replaced = match object {
            ObjectOf::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, ns).is_some()
            }
            ObjectOf::Pod(mut pod) => {
                let key = pod.key();
                self.share_at(&key, &mut pod);
                self.pods.insert(key, pod).is_some()
            }
            ObjectOf::Service(svc) => {
                let key = key_of(&svc.metadata);
                self.services.insert(key, svc).is_some()
            }
            ObjectOf::AuthorizationPolicy(policy) => {
                let key = key_of(&policy.metadata);
                self.policies.insert(key, policy).is_some()
            }
        };
        replaced.then_some(describe)
    }

    /// Lets `pod` share what it has in common with the pods held next to
    /// it ([`PodForm::share_with`]), before it is stored anywhere.
    pub fn share_with_neighbours(&self, pod: &mut P) {
        self.share_at(&pod.key(), pod);
    }

    fn share_at(&self, key: &ObjectKey, pod: &mut P) {
        let before = self
            .pods
            .range::<ObjectKey, _>((Bound::Unbounded, Bound::Excluded(key)))
            .next_back();
        let after = self
            .pods
            .range::<ObjectKey, _>((Bound::Excluded(key), Bound::Unbounded))
            .next();
        for (_, neighbour) in before.into_iter().chain(after) {
            pod.share_with(neighbour);
        }
    }

    /// Removes an object, if present.
    pub fn remove(&mut self, id: &ObjectId) {
        match id.kind {
            Kind::Namespace => {
                self.namespaces.remove(&id.key.1);
            }
            Kind::Pod => {
                self.pods.remove(&id.key);
            }
            Kind::Service => {
                self.services.remove(&id.key);
            }
            Kind::AuthorizationPolicy => {
                self.policies.remove(&id.key);
            }
        }
    }
}

impl ClusterObjects {
    /// These objects as the translation reads them: the same namespaces,
    /// Services and policies, each pod as a [`MeshPod`].
    pub fn with_mesh_pods(&self) -> SlimObjects {
        let mut slim = SlimObjects {
            namespaces: self.namespaces.clone(),
            services: self.services.clone(),
            policies: self.policies.clone(),
            ..SlimObjects::default()
        };
        for pod in self.pods.values() {
            slim.insert(ObjectOf::Pod(Arc::new(MeshPod::from((**pod).clone()))));
        }
        slim
    }
}

pub(crate) fn key_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use kanava_mesh::Labels;

    use super::*;
    use crate::parse_manifests;

    fn pod(name: &str, app: &str) -> SlimObject {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: {name}, labels: {{app: {app}}}}}\nspec: {{containers: [], nodeName: node-1}}\nstatus: {{podIP: 10.0.0.1}}\n"
        );
        let (mut objects, _) = parse_manifests(&text).unwrap();
        objects.remove(0).slimmed()
    }

    fn labels_of(objects: &SlimObjects, name: &str) -> Labels {
        objects.pods[&("shop".to_string(), name.to_string())]
            .labels
            .clone()
    }

    #[test]
    fn siblings_share_one_label_map() {
        let mut objects = SlimObjects::default();
        objects.insert(pod("web-7d9f-aaaaa", "web"));
        objects.insert(pod("web-7d9f-bbbbb", "web"));
        objects.insert(pod("worker-1", "worker"));
        let (a, b) = (
            labels_of(&objects, "web-7d9f-aaaaa"),
            labels_of(&objects, "web-7d9f-bbbbb"),
        );
        assert!(Arc::ptr_eq(&a, &b), "equal neighbours share");
        let worker = labels_of(&objects, "worker-1");
        assert!(!Arc::ptr_eq(&b, &worker), "different labels stay apart");
        assert_eq!(worker.get("app").map(String::as_str), Some("worker"));
    }

    #[test]
    fn a_pod_held_elsewhere_is_not_copied_to_share() {
        let mut objects = SlimObjects::default();
        objects.insert(pod("web-7d9f-aaaaa", "web"));
        let SlimObject::Pod(mut held) = pod("web-7d9f-bbbbb", "web") else {
            unreachable!("a pod")
        };
        let elsewhere = held.clone();
        objects.share_with_neighbours(&mut held);
        assert!(Arc::ptr_eq(&held, &elsewhere), "not copied");
        assert!(!Arc::ptr_eq(
            &held.labels,
            &labels_of(&objects, "web-7d9f-aaaaa")
        ));
    }
}
