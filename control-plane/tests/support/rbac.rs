//! Enough of Kubernetes' RBAC authorizer to check every request the control
//! plane made against `deploy/rbac/control-plane.yaml`.

#![allow(dead_code)]

use serde_json::Value;

/// An API request as RBAC sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// A request outside the API (`/openid/v1/jwks`): RBAC's
    /// `nonResourceURLs`.
    pub non_resource_path: Option<String>,
}

/// `METHOD /path?query`, as the in-test API server logs it.
pub fn attributes_of(request: &str) -> Attributes {
    let (method, rest) = request.split_once(' ').unwrap();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if !matches!(parts.first(), Some(&"api" | &"apis")) {
        return Attributes {
            verb: method.to_lowercase(),
            group: String::new(),
            resource: String::new(),
            namespace: None,
            name: None,
            non_resource_path: Some(path.to_string()),
        };
    }
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest.to_vec()),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest.to_vec()),
        _ => panic!("not an API path: {request}"),
    };
    let (namespace, rest) = match rest.as_slice() {
        ["namespaces", ns, resource, rest @ ..] => (Some(ns.to_string()), {
            let mut v = vec![*resource];
            v.extend_from_slice(rest);
            v
        }),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest.as_slice() {
        [resource] => (resource.to_string(), None, None),
        [resource, name] => (resource.to_string(), Some(name.to_string()), None),
        [resource, name, sub] => (resource.to_string(), Some(name.to_string()), Some(*sub)),
        _ => panic!("unexpected path: {request}"),
    };
    let watch = query.split('&').any(|p| p == "watch=true");
    let verb = match (method, &name, watch) {
        ("GET", None, true) => "watch",
        ("GET", None, false) => "list",
        ("GET", Some(_), _) => "get",
        ("POST", _, _) => "create",
        ("PATCH", _, _) => "patch",
        ("PUT", _, _) => "update",
        ("DELETE", _, _) => "delete",
        _ => panic!("unexpected method: {request}"),
    };
    Attributes {
        verb: verb.into(),
        group,
        resource: match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource,
        },
        namespace,
        name,
        non_resource_path: None,
    }
}

/// The RBAC objects of a YAML file.
pub fn load(path: &std::path::Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the ClusterRoles (anywhere) and Roles (in their namespace) of
/// `objects` allow `request`.
pub fn allows(objects: &[Value], request: &Attributes) -> bool {
    if let Some(path) = &request.non_resource_path {
        return objects.iter().any(|object| {
            object["kind"] == "ClusterRole"
                && object["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        strings(&rule["nonResourceURLs"]).contains(path)
                            && strings(&rule["verbs"]).contains(&request.verb)
                    })
        });
    }
    objects.iter().any(|object| {
        let scope_ok = match object["kind"].as_str() {
            Some("ClusterRole") => true,
            Some("Role") => {
                request.namespace.as_deref() == object["metadata"]["namespace"].as_str()
            }
            _ => return false,
        };
        scope_ok
            && object["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    let names = strings(&rule["resourceNames"]);
                    strings(&rule["apiGroups"]).contains(&request.group)
                        && strings(&rule["resources"]).contains(&request.resource)
                        && strings(&rule["verbs"]).contains(&request.verb)
                        && (names.is_empty()
                            || request.name.as_ref().is_some_and(|n| names.contains(n)))
                })
    })
}
