//! The lab's stand-in for the API server: the directory of manifests the
//! control plane watches. Every write gets the next `resourceVersion`, as an
//! API server would give, so anyone can tell when a change has reached the
//! ztunnels (they report the versions they hold).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kanava_cluster::{ClusterObjects, Object, read_manifest_dir};

use crate::Error;
use crate::files::write_atomically;
use crate::state::LabState;

/// The manifest directory of one lab.
pub struct Manifests {
    dir: PathBuf,
}

impl Manifests {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Manifests { dir: dir.into() }
    }

    /// Every object stored.
    pub fn read(&self) -> Result<ClusterObjects, Error> {
        read_manifest_dir(&self.dir).map_err(|e| Error::State {
            path: e.path.display().to_string(),
            reason: e.reason,
        })
    }

    /// Stores `object` with the lab's next resource version, which it
    /// returns.
    pub fn write(&self, state: &mut LabState, mut object: Object) -> Result<u64, Error> {
        state.resource_version += 1;
        let version = state.resource_version;
        meta_mut(&mut object).resource_version = Some(version.to_string());
        let path = self.path_of(&object);
        let yaml = match &object {
            Object::Namespace(o) => serde_yaml::to_string(o.as_ref()),
            Object::Pod(o) => serde_yaml::to_string(o.as_ref()),
            Object::Service(o) => serde_yaml::to_string(o.as_ref()),
            Object::AuthorizationPolicy(o) => serde_yaml::to_string(o.as_ref()),
        }
        .map_err(|e| Error::Spec(format!("cannot write {}: {e}", object.describe())))?;
        write_atomically(&path, yaml.as_bytes())?;
        Ok(version)
    }

    /// Deletes a stored object.
    pub fn remove(&self, object: &Object) -> Result<(), Error> {
        let path = self.path_of(object);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()))(e)),
        }
    }

    fn path_of(&self, object: &Object) -> PathBuf {
        let meta = meta(object);
        let kind = object.kind().as_str().to_lowercase();
        let name = meta.name.as_deref().unwrap_or("");
        let file = match object {
            Object::Namespace(_) => format!("{kind}_{name}.yaml"),
            _ => format!(
                "{kind}_{}_{name}.yaml",
                meta.namespace.as_deref().unwrap_or("default")
            ),
        };
        self.dir.join(file)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

pub fn meta(object: &Object) -> &ObjectMeta {
    match object {
        Object::Namespace(o) => &o.metadata,
        Object::Pod(o) => &o.metadata,
        Object::Service(o) => &o.metadata,
        Object::AuthorizationPolicy(o) => &o.metadata,
    }
}

pub fn meta_mut(object: &mut Object) -> &mut ObjectMeta {
    match object {
        Object::Namespace(o) => &mut Arc::make_mut(o).metadata,
        Object::Pod(o) => &mut Arc::make_mut(o).metadata,
        Object::Service(o) => &mut Arc::make_mut(o).metadata,
        Object::AuthorizationPolicy(o) => &mut Arc::make_mut(o).metadata,
    }
}

/// `namespace/name` (or just `name` for namespaces).
pub fn key(object: &Object) -> String {
    let meta = meta(object);
    let name = meta.name.clone().unwrap_or_default();
    match object {
        Object::Namespace(_) => name,
        _ => format!("{}/{name}", meta.namespace.as_deref().unwrap_or("default")),
    }
}
