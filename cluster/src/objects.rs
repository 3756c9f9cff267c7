//! The cluster objects the mesh reads, as the Kubernetes API returns them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};

use crate::crd::AuthorizationPolicy;
/// `namespace/name` of a namespaced object.
pub type ObjectKey = (String, String);

/// The cluster objects the mesh cares about, as the API server would return
/// them. Objects are shared, so a new view of a large cluster costs little
/// more than its map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterObjects {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub policies: BTreeMap<ObjectKey, Arc<AuthorizationPolicy>>,
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

/// One object read from a manifest.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
}

impl Object {
    pub fn id(&self) -> ObjectId {
        let key = match self {
            Object::Namespace(o) => (String::new(), o.metadata.name.clone().unwrap_or_default()),
            Object::Pod(o) => key_of(&o.metadata),
            Object::Service(o) => key_of(&o.metadata),
            Object::AuthorizationPolicy(o) => key_of(&o.metadata),
        };
        ObjectId {
            kind: self.kind(),
            key,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub fn describe(&self) -> String {
        let meta = match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
        };
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match (&meta.namespace, self) {
            (_, Object::Namespace(_)) => format!("Namespace {name}"),
            (Some(ns), _) => format!("{} {ns}/{name}", self.kind()),
            (None, _) => format!("{} default/{name}", self.kind()),
        }
    }
}

impl ClusterObjects {
    /// Adds or replaces an object. Returns the description of the object it
    /// replaced, if any.
    pub fn insert(&mut self, object: Object) -> Option<String> {
        let describe = object.describe();
        let replaced = match object {
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, ns).is_some()
            }
            Object::Pod(pod) => {
                let key = key_of(&pod.metadata);
                self.pods.insert(key, pod).is_some()
            }
            Object::Service(svc) => {
                let key = key_of(&svc.metadata);
                self.services.insert(key, svc).is_some()
            }
            Object::AuthorizationPolicy(policy) => {
                let key = key_of(&policy.metadata);
                self.policies.insert(key, policy).is_some()
            }
        };
        replaced.then_some(describe)
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

pub(crate) fn key_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}
