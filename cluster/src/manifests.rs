//! Reading Kubernetes manifests (multi-document YAML or JSON) into
//! [`Object`]s: the lab's files, the control plane's manifest directory.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};

use crate::crd::{self, AuthorizationPolicy};
use crate::objects::Object;

/// A manifest that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document}{}: {reason}", kind.as_ref().map(|k| format!(" ({k})")).unwrap_or_default())]
pub struct ManifestError {
    /// 1-based position of the YAML document in its file.
    pub document: usize,
    /// `kind` of the document, when it has one.
    pub kind: Option<String>,
    pub reason: String,
}

/// A document of a kind the mesh does not use.
#[derive(Debug, Clone, PartialEq)]
pub struct Other {
    pub document: usize,
    pub kind: String,
    /// The whole document, for callers that understand more kinds.
    pub value: serde_yaml::Value,
}

/// A file of a manifest directory that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ManifestDirError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// Reads every `*.yaml` file of a directory in name order (hidden files,
/// writes in progress, are skipped); an object in a later file replaces one
/// of the same name. A missing directory holds nothing.
pub fn read_manifest_dir(dir: &std::path::Path) -> Result<crate::ClusterObjects, ManifestDirError> {
    let failed = |path: &std::path::Path, reason: String| ManifestDirError {
        path: path.to_path_buf(),
        reason,
    };
    let mut objects = crate::ClusterObjects::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(objects),
        Err(e) => return Err(failed(dir, e.to_string())),
    };
    let mut paths: Vec<std::path::PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| failed(&path, e.to_string()))?;
        let (parsed, _) = parse_manifests(&text).map_err(|e| failed(&path, e.to_string()))?;
        for object in parsed {
            objects.insert(object);
        }
    }
    Ok(objects)
}

/// Reads a multi-document YAML (or JSON) stream of Kubernetes objects.
///
/// Namespaced objects without `metadata.namespace` land in `default`, as
/// `kubectl apply` would put them. Documents of other kinds are returned in
/// the second list for the caller to use or ignore.
pub fn parse_manifests(text: &str) -> Result<(Vec<Object>, Vec<Other>), ManifestError> {
    use serde::Deserialize;

    let mut objects = Vec::new();
    let mut others = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = index + 1;
        let value = serde_yaml::Value::deserialize(document).map_err(|e| ManifestError {
            document: number,
            kind: None,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let kind = value
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .ok_or_else(|| ManifestError {
                document: number,
                kind: None,
                reason: "missing `kind`".into(),
            })?
            .to_string();
        let error = |e: serde_yaml::Error| ManifestError {
            document: number,
            kind: Some(kind.clone()),
            reason: e.to_string(),
        };
        let object = match kind.as_str() {
            "Namespace" => {
                Object::Namespace(Arc::new(serde_yaml::from_value(value).map_err(error)?))
            }
            "Pod" => {
                let mut pod: Pod = serde_yaml::from_value(value).map_err(error)?;
                pod.metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                Object::Pod(Arc::new(pod))
            }
            "Service" => {
                let mut service: Service = serde_yaml::from_value(value).map_err(error)?;
                service
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                Object::Service(Arc::new(service))
            }
            "AuthorizationPolicy" => {
                let api_version = value.get("apiVersion").and_then(serde_yaml::Value::as_str);
                if api_version != Some(crd::API_VERSION) {
                    return Err(ManifestError {
                        document: number,
                        kind: Some(kind),
                        reason: format!("apiVersion must be {}", crd::API_VERSION),
                    });
                }
                let mut policy: AuthorizationPolicy =
                    serde_yaml::from_value(value).map_err(error)?;
                policy
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                Object::AuthorizationPolicy(Arc::new(policy))
            }
            _ => {
                others.push(Other {
                    document: number,
                    kind,
                    value,
                });
                continue;
            }
        };
        objects.push(object);
    }
    Ok((objects, others))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_manifests() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    kanava.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
spec:
  serviceAccountName: web
  containers:
  - name: web
    image: nginx
---
apiVersion: v1
kind: Pod
metadata:
  name: loose
spec:
  containers: []
---
kind: Lab
nodes: 2
---
"#;
        let (objects, others) = parse_manifests(text).unwrap();
        assert_eq!(objects.len(), 3);
        assert_eq!(objects[0].describe(), "Namespace shop");
        assert_eq!(objects[1].describe(), "Pod shop/web");
        assert_eq!(objects[2].describe(), "Pod default/loose");
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].kind, "Lab");
        assert_eq!(others[0].document, 4);
    }

    #[test]
    fn errors_name_the_document() {
        let err = parse_manifests("kind: Pod\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Pod\napiVersion: v1\nspec: 7\n")
            .unwrap_err();
        assert_eq!(err.document, 2);
        assert_eq!(err.kind.as_deref(), Some("Pod"));

        let err = parse_manifests("metadata: {name: a}\n").unwrap_err();
        assert!(err.reason.contains("kind"), "{err}");

        let err = parse_manifests("kind: [unclosed\n").unwrap_err();
        assert_eq!(err.document, 1);
    }
}
