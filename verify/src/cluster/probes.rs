//! The probe workloads `kanava verify` places on a cluster: three
//! temporary namespaces (enrolled STRICT, enrolled PERMISSIVE, and one
//! outside the mesh), each labelled with the run, and their pods pinned to
//! nodes. Everything is found again by the run's label, so a cleanup after
//! an interruption removes what was made even halfway.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod, ServiceAccount};
use kanava_mesh::names;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::time::Instant;

use super::exec::CONTAINER;

/// Label on everything a run makes; its value is the run's id.
pub const RUN_LABEL: &str = "kanava.io/verify-run";
/// Port of the UDP echo in the client pod (no annotation opens it).
pub const UDP_PORT: u16 = 39_998;
/// Port of the HTTP server in the client, permissive and outsider pods.
pub const HTTP_PORT: u16 = 8080;

/// The role of a probe pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Enrolled, STRICT, on the first node: the attacker's seat.
    Client,
    /// Enrolled, STRICT, on another node where there is one: the echo
    /// server the traffic checks reach.
    Server,
    /// Enrolled, STRICT, on the client's node: the same-node path.
    NearServer,
    /// Enrolled, PERMISSIVE.
    Permissive,
    /// Outside the mesh.
    Outsider,
    /// On the client's node's own network, capturing its traffic (only
    /// when the operator allows it: `--host-network-capture`).
    Capture,
}

impl Role {
    /// The roles of a run; the capture only when it is allowed.
    pub fn all(capture: bool) -> Vec<Role> {
        let mut roles = vec![
            Role::Client,
            Role::Server,
            Role::NearServer,
            Role::Permissive,
            Role::Outsider,
        ];
        if capture {
            roles.push(Role::Capture);
        }
        roles
    }

    pub fn pod_name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::NearServer => "near-server",
            Role::Permissive => "web",
            Role::Outsider => "outsider",
            Role::Capture => "capture",
        }
    }

    fn namespace_kind(self) -> &'static str {
        match self {
            Role::Client | Role::Server | Role::NearServer => "strict",
            Role::Permissive => "permissive",
            Role::Outsider | Role::Capture => "outside",
        }
    }

    /// The service account, hence the identity: one per role.
    pub fn service_account(self) -> &'static str {
        self.pod_name()
    }

    fn args(self) -> Vec<String> {
        let args = match self {
            Role::Server | Role::NearServer => vec!["echo", "--port", "39999"],
            _ => vec!["http", "--port", "8080"],
        };
        args.into_iter().map(str::to_string).collect()
    }
}

/// The namespaces of run `id`.
pub fn namespace(id: &str, role: Role) -> String {
    format!("kanava-verify-{id}-{}", role.namespace_kind())
}

/// What the probe pods run and where.
#[derive(Clone, Debug)]
pub struct Placement {
    pub image: String,
    pub pull_policy: String,
    /// The client's node.
    pub near: String,
    /// Another node, or the client's when there is only one.
    pub far: String,
}

impl Placement {
    pub fn node(&self, role: Role) -> &str {
        match role {
            Role::Client | Role::NearServer | Role::Capture => &self.near,
            _ => &self.far,
        }
    }
}

fn namespace_object(id: &str, kind: &str) -> Result<Namespace, String> {
    let mut labels = BTreeMap::from([
        (RUN_LABEL.to_string(), id.to_string()),
        // The client takes CAP_NET_ADMIN, as an attacker may.
        (
            "pod-security.kubernetes.io/enforce".to_string(),
            "privileged".to_string(),
        ),
    ]);
    if kind != "outside" {
        labels.insert(names::DATAPLANE_MODE_LABEL.into(), names::AMBIENT.into());
    }
    if kind == "permissive" {
        labels.insert(names::MTLS_MODE_LABEL.into(), "permissive".into());
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("kanava-verify-{id}-{kind}"), "labels": labels}
    }))
    .map_err(|e| e.to_string())
}

fn pod_object(id: &str, role: Role, placement: &Placement) -> Result<Pod, String> {
    let mut app = json!({
        "name": CONTAINER,
        "image": placement.image,
        "imagePullPolicy": placement.pull_policy,
        "args": role.args(),
        "securityContext": match role {
            Role::Client => json!({"capabilities": {"add": ["NET_ADMIN"]}}),
            // A packet socket on the node's network.
            Role::Capture => json!({"capabilities": {"add": ["NET_RAW", "NET_ADMIN"]}}),
            _ => json!({}),
        },
    });
    if role == Role::Capture {
        // It only waits: each capture is an exec of its own.
        app["command"] = json!(["sleep"]);
        app["args"] = json!(["infinity"]);
    } else {
        // Ready once its server accepts, asked on the pod's loopback (which
        // the capture leaves alone: from outside, the ztunnel would accept
        // for it).
        let port = match role {
            Role::Server | Role::NearServer => crate::PROBE_PORT,
            _ => HTTP_PORT,
        };
        app["readinessProbe"] = json!({
            "exec": {"command": [super::exec::PROBE_PROGRAM, "pipe", "--to", format!("127.0.0.1:{port}")]},
            "periodSeconds": 1,
        });
    }
    let mut containers = vec![app];
    if role == Role::Client {
        containers.push(json!({
            "name": "udp",
            "image": placement.image,
            "imagePullPolicy": placement.pull_policy,
            "args": ["udp-echo", "--port", UDP_PORT.to_string()],
        }));
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": role.pod_name(),
            "namespace": namespace(id, role),
            "labels": {RUN_LABEL: id, "app": role.pod_name()},
        },
        "spec": {
            "serviceAccountName": role.service_account(),
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [{
                    "key": "metadata.name", "operator": "In",
                    "values": [placement.node(role)],
                }]}],
            }}},
            "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
            "hostNetwork": role == Role::Capture,
            "containers": containers,
        }
    }))
    .map_err(|e| e.to_string())
}

/// Creates the namespaces, service accounts and pods (of `roles`) of run
/// `id`.
pub async fn create(
    client: &Client,
    id: &str,
    placement: &Placement,
    roles: &[Role],
) -> Result<(), String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for kind in ["strict", "permissive", "outside"] {
        namespaces
            .create(&PostParams::default(), &namespace_object(id, kind)?)
            .await
            .map_err(|e| format!("create namespace kanava-verify-{id}-{kind}: {e}"))?;
    }
    for &role in roles {
        let namespace = namespace(id, role);
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        let account: ServiceAccount = serde_json::from_value(json!({
            "metadata": {"name": role.service_account(), "labels": {RUN_LABEL: id}},
            "automountServiceAccountToken": false,
        }))
        .map_err(|e| e.to_string())?;
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(format!("create service account in {namespace}: {error}")),
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        pods.create(&PostParams::default(), &pod_object(id, role, placement)?)
            .await
            .map_err(|e| format!("create pod {namespace}/{}: {e}", role.pod_name()))?;
    }
    Ok(())
}

/// Waits until every probe pod is running with its containers ready; the
/// pods by role. On timeout, says why each waiting pod waits (its
/// containers' state and its last event, such as a CNI plugin's refusal).
pub async fn wait_ready(
    client: &Client,
    id: &str,
    roles: &[Role],
    within: Duration,
) -> Result<BTreeMap<Role, Pod>, String> {
    let deadline = Instant::now() + within;
    loop {
        let mut ready = BTreeMap::new();
        let mut waiting = Vec::new();
        for &role in roles {
            let namespace = namespace(id, role);
            let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            match pods.get_opt(role.pod_name()).await {
                Ok(Some(pod)) if is_ready(&pod) => {
                    ready.insert(role, pod);
                }
                Ok(Some(pod)) => waiting.push((role, Some(pod))),
                Ok(None) => waiting.push((role, None)),
                Err(error) => return Err(format!("read pod {namespace}: {error}")),
            }
        }
        if waiting.is_empty() {
            return Ok(ready);
        }
        if Instant::now() > deadline {
            let mut reasons = Vec::new();
            for (role, pod) in waiting {
                reasons.push(why_waiting(client, id, role, pod.as_ref()).await);
            }
            return Err(format!(
                "probe pods not ready within {}:\n  {}",
                humantime_secs(within),
                reasons.join("\n  ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|all| !all.is_empty() && all.iter().all(|c| c.ready))
        && status.and_then(|s| s.pod_ip.as_ref()).is_some()
}

async fn why_waiting(client: &Client, id: &str, role: Role, pod: Option<&Pod>) -> String {
    let namespace = namespace(id, role);
    let name = format!("{namespace}/{}", role.pod_name());
    let Some(pod) = pod else {
        return format!("{name}: not created");
    };
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    let containers: Vec<String> = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|all| {
            all.iter()
                .filter_map(|c| {
                    let waiting = c.state.as_ref()?.waiting.as_ref()?;
                    Some(format!(
                        "{}: {} {}",
                        c.name,
                        waiting.reason.clone().unwrap_or_default(),
                        waiting.message.clone().unwrap_or_default()
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let last_event = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={}", role.pod_name())))
        .await
        .ok()
        .and_then(|list| {
            list.items
                .into_iter()
                .filter(|e| e.type_.as_deref() == Some("Warning"))
                .max_by_key(|e| e.last_timestamp.clone().map(|t| t.0))
        })
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        });
    format!(
        "{name}: {phase}{}{}",
        if containers.is_empty() {
            String::new()
        } else {
            format!(" ({})", containers.join("; "))
        },
        last_event
            .map(|e| format!("; last warning: {}", e.trim()))
            .unwrap_or_default()
    )
}

/// Deletes everything of run `id` and waits (up to `within`) until its
/// namespaces are gone. The namespaces it found, and those still there.
pub async fn remove(
    client: &Client,
    id: &str,
    within: Duration,
) -> Result<(Vec<String>, Vec<String>), String> {
    remove_namespaces(client, &format!("{RUN_LABEL}={id}"), within).await
}

/// Deletes the namespaces `selector` matches (their pods at once: their
/// grace is not a probe's to wait for) and waits up to `within` until
/// they are gone. The namespaces it found, and those still there.
pub async fn remove_namespaces(
    client: &Client,
    selector: &str,
    within: Duration,
) -> Result<(Vec<String>, Vec<String>), String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = || async {
        namespaces
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|e| format!("list namespaces {selector}: {e}"))
            .map(|list| {
                list.items
                    .into_iter()
                    .filter_map(|n| n.metadata.name)
                    .collect::<Vec<String>>()
            })
    };
    let found = list().await?;
    for name in &found {
        let pods: Api<Pod> = Api::namespaced(client.clone(), name);
        let _ = pods
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &ListParams::default(),
            )
            .await;
        match namespaces.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(format!("delete namespace {name}: {error}")),
        }
    }
    let deadline = Instant::now() + within;
    loop {
        let left = list().await?;
        if left.is_empty() || Instant::now() > deadline {
            return Ok((found, left));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
