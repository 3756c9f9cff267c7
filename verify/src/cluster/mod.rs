//! The checks' ground on a live cluster, reached through its API server.
//!
//! [`ClusterGround::prepare`] places probe pods ([`probes`]) on up to two
//! nodes, in temporary namespaces; a check acts from inside them with
//! `exec` ([`exec`]), reads the ztunnels' logs through the API server, asks
//! for a node's credential with a TokenRequest bound to that node's ztunnel
//! pod (a short-lived token that never enters a probe pod: it travels
//! inside the check's own TLS connection), and applies its temporary DENY
//! policy through the API. [`probes::remove`] takes it all away again.
//!
//! What a cluster does not let it see, it says: the traffic between nodes
//! is not visible from a pod, so the fabric check is skipped and the access
//! log check stands in for it.

pub mod exec;
pub mod probes;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kanava_mesh::ports;
use kube::api::{DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};

use self::exec::ExecCapture;
use self::probes::{Placement, Role};
use crate::{
    CaptureUnavailable, Check, Dial, Family, Ground, Listener, PROBE_PORT, Seat, Seats, Stream,
};

/// Label of the ztunnels' pods (the chart's).
pub const ZTUNNEL_PODS: &str = "app.kubernetes.io/name=ztunnel";
/// The control plane's Service, Deployment and root ConfigMap (the chart's).
const CONTROL_PLANE: &str = "kanava-control-plane";
const ROOT_CONFIG_MAP: &str = "kanava-root-cert";
const ROOT_KEY: &str = "root-cert.pem";
/// Audience of the tokens the control plane accepts from ztunnels.
const NODE_AUDIENCE: &str = "kanava";

/// Where and how to reach the cluster, and what to run there.
#[derive(Clone, Debug)]
pub struct Options {
    /// A kubeconfig file; `None`: the usual search (`KUBECONFIG`, then
    /// `~/.kube/config`, then in-cluster).
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Where the chart is installed.
    pub mesh_namespace: String,
    /// The probe image (`labapp`).
    pub image: String,
    pub pull_policy: String,
    /// How long probe pods may take to start.
    pub ready_within: Duration,
    /// Whether a probe pod may run on the client's node's own network with
    /// `CAP_NET_RAW`, to capture what crosses between the nodes.
    pub host_network_capture: bool,
}

/// A client for the cluster named by `kubeconfig` and `context`.
pub async fn client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<Client, String> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("read {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| format!("use {}: {e}", path.display()))?
        }
        None => kube::Config::from_kubeconfig(&options)
            .await
            .or_else(|_| kube::Config::incluster())
            .map_err(|e| format!("no kubeconfig (--kubeconfig or KUBECONFIG): {e}"))?,
    };
    Client::try_from(config).map_err(|e| e.to_string())
}

/// A new run's id: short, random, valid in a namespace's name.
pub fn new_run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_string()
}

/// The ground of one run: its probe pods, the mesh's addresses and roots.
pub struct ClusterGround {
    client: Client,
    mesh_namespace: String,
    id: String,
    probes: BTreeMap<Role, Pod>,
    placement: Placement,
    node_ips: BTreeMap<String, Vec<IpAddr>>,
    control_plane: SocketAddr,
    roots: kanava_tls::MeshRoots,
    trust_domain: String,
}

impl ClusterGround {
    /// Finds the mesh, places the probe pods of run `id` and waits for
    /// them. `say` hears each step. Also returns checks of what the run
    /// found on the way (a ztunnel on each probe node).
    pub async fn prepare(
        client: Client,
        options: &Options,
        id: &str,
        say: &mut dyn FnMut(&str),
    ) -> Result<(ClusterGround, Vec<Check>), String> {
        let ns = &options.mesh_namespace;
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        let service = services
            .get_opt(CONTROL_PLANE)
            .await
            .map_err(|e| format!("read service {ns}/{CONTROL_PLANE}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "the mesh is not installed in namespace {ns} (no service {CONTROL_PLANE}): \
                     helm install mesh deploy/charts/kanava -n {ns} --create-namespace, \
                     or name its namespace with --namespace"
                )
            })?;
        let cluster_ip: IpAddr = service
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| format!("service {ns}/{CONTROL_PLANE} has no cluster IP"))?;
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let pem = config_maps
            .get_opt(ROOT_CONFIG_MAP)
            .await
            .map_err(|e| format!("read {ns}/{ROOT_CONFIG_MAP}: {e}"))?
            .and_then(|c| c.data?.get(ROOT_KEY).cloned())
            .ok_or_else(|| {
                format!(
                    "no mesh root in {ns}/{ROOT_CONFIG_MAP}: is the control plane running? \
                     (kanava status --kubeconfig ...)"
                )
            })?;
        let roots = kanava_tls::MeshRoots::from_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let trust_domain = trust_domain(&client, ns).await;

        let nodes: Api<Node> = Api::all(client.clone());
        let mut ready_nodes: Vec<Node> = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("list nodes: {e}"))?
            .items
            .into_iter()
            .filter(node_is_ready)
            .collect();
        ready_nodes.sort_by_key(|n| n.metadata.name.clone());
        let names: Vec<String> = ready_nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let (Some(near), far) = (names.first().cloned(), names.get(1).cloned()) else {
            return Err("no node is Ready and schedulable".into());
        };
        let node_ips = ready_nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, internal_ips(n))))
            .collect();
        let placement = Placement {
            image: options.image.clone(),
            pull_policy: options.pull_policy.clone(),
            far: far.clone().unwrap_or_else(|| near.clone()),
            near,
        };
        say(&format!(
            "probe pods on {} (image {}), in namespaces kanava-verify-{id}-{{strict,permissive,outside}}",
            match &far {
                Some(far) => format!("nodes {} and {far}", placement.near),
                None => format!("node {} (the only one: no cross-node path)", placement.near),
            },
            options.image
        ));
        let mut found = Vec::new();
        for node in [&placement.near, &placement.far] {
            if found
                .iter()
                .any(|c: &Check| c.name.ends_with(node.as_str()))
            {
                continue;
            }
            let check = Check::new(&format!("a ztunnel on {node}"), "one pod, Ready");
            found.push(match ztunnel_pod(&client, ns, node).await {
                Ok(pod) if pod_ready(&pod) => {
                    check.pass(format!("{ns}/{}", pod.metadata.name.unwrap_or_default()))
                }
                Ok(pod) => check
                    .fail(format!(
                        "{ns}/{} is not Ready",
                        pod.metadata.name.unwrap_or_default()
                    ))
                    .fix_if_failed(format!("kubectl -n {ns} describe pod and its log")),
                Err(error) => check.fail(error).fix_if_failed(format!(
                    "the ztunnel DaemonSet is missing or does not run there: \
                     helm upgrade --install mesh deploy/charts/kanava -n {ns}, then \
                     kanava status --kubeconfig ..."
                )),
            });
        }
        let roles = Role::all(options.host_network_capture);
        probes::create(&client, id, &placement, &roles).await?;
        say("waiting for the probe pods");
        let probes = probes::wait_ready(&client, id, &roles, options.ready_within).await?;
        Ok((
            ClusterGround {
                client,
                mesh_namespace: ns.clone(),
                id: id.to_string(),
                probes,
                placement,
                node_ips,
                control_plane: SocketAddr::new(cluster_ip, ports::CONTROL_PLANE),
                roots,
                trust_domain,
            },
            found,
        ))
    }

    fn seat(&self, role: Role, family: Family) -> Option<Seat> {
        let pod = self.probes.get(&role)?;
        let ip = pod
            .status
            .as_ref()?
            .pod_ips
            .as_ref()?
            .iter()
            .filter_map(|ip| ip.ip.parse::<IpAddr>().ok())
            .find(|ip| Family::of(*ip) == family)?;
        let namespace = probes::namespace(&self.id, role);
        let enrolled = matches!(
            role,
            Role::Client | Role::Server | Role::NearServer | Role::Permissive
        );
        let account = pod.spec.as_ref()?.service_account_name.clone()?;
        Some(Seat {
            name: format!("{namespace}/{}", role.pod_name()),
            node: self.placement.node(role).to_string(),
            identity: enrolled
                .then(|| format!("spiffe://{}/ns/{namespace}/sa/{account}", self.trust_domain)),
            namespace,
            ip,
            http_port: Some(probes::HTTP_PORT),
        })
    }

    fn pods_of(&self, seat: &Seat) -> (Api<Pod>, String) {
        let name = seat.name.rsplit('/').next().unwrap_or_default().to_string();
        (Api::namespaced(self.client.clone(), &seat.namespace), name)
    }
}

fn node_is_ready(node: &Node) -> bool {
    let schedulable = !node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    schedulable && ready
}

fn internal_ips(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|all| {
            all.iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The ztunnel pod on `node`.
pub async fn ztunnel_pod(client: &Client, namespace: &str, node: &str) -> Result<Pod, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.list(
        &ListParams::default()
            .labels(ZTUNNEL_PODS)
            .fields(&format!("spec.nodeName={node}")),
    )
    .await
    .map_err(|e| format!("list the ztunnel pods: {e}"))?
    .items
    .into_iter()
    .find(|p| p.metadata.deletion_timestamp.is_none())
    .ok_or_else(|| format!("no ztunnel pod on {node} (namespace {namespace})"))
}

/// The trust domain the control plane signs for (the chart's setting).
async fn trust_domain(client: &Client, namespace: &str) -> String {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    deployments
        .get_opt(CONTROL_PLANE)
        .await
        .ok()
        .flatten()
        .and_then(|d| {
            d.spec?.template.spec?.containers.into_iter().find_map(|c| {
                c.env?
                    .into_iter()
                    .find(|e| e.name == "KANAVA_TRUST_DOMAIN")?
                    .value
            })
        })
        .unwrap_or_else(|| "cluster.local".into())
}

fn authorization_policies() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.kanava.io", "v1alpha1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

fn policy_from(yaml: &str) -> Result<DynamicObject, String> {
    serde_yaml::from_str(yaml).map_err(|e| format!("policy: {e}"))
}

impl Ground for ClusterGround {
    fn families(&self) -> Vec<Family> {
        let mut families = Vec::new();
        for family in [Family::IPv4, Family::IPv6] {
            if self.seat(Role::Client, family).is_some() {
                families.push(family);
            }
        }
        // The primary family first: the pod's first address's.
        if let Some(first) = self
            .probes
            .get(&Role::Client)
            .and_then(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse::<IpAddr>().ok())
        {
            families.sort_by_key(|f| *f != Family::of(first));
        }
        families
    }

    fn seats(&self, family: Family) -> Option<Seats> {
        let client = self.seat(Role::Client, family)?;
        let node_side = client.clone();
        let mut servers = vec![self.seat(Role::Server, family)?];
        if self.placement.far != self.placement.near {
            servers.extend(self.seat(Role::NearServer, family));
        }
        Some(Seats {
            family,
            client,
            client_is_strict: true,
            servers,
            impostor: self.seat(Role::Permissive, family),
            outsider: self.seat(Role::Outsider, family)?,
            node_side,
            permissive: self.seat(Role::Permissive, family),
        })
    }

    async fn ztunnel_addresses(&self, node: &str, family: Family) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self
            .node_ips
            .get(node)
            .into_iter()
            .flatten()
            .copied()
            .filter(|ip| Family::of(*ip) == family)
            .collect();
        if let Ok(pod) = ztunnel_pod(&self.client, &self.mesh_namespace, node).await {
            let pod_ips = pod
                .status
                .and_then(|s| s.pod_ips)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|ip| ip.ip.parse::<IpAddr>().ok());
            for ip in pod_ips {
                if Family::of(ip) == family && !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
        addresses
    }

    fn control_plane(&self) -> SocketAddr {
        self.control_plane
    }

    fn mesh_roots(&self) -> Result<kanava_tls::MeshRoots, String> {
        Ok(self.roots.clone())
    }

    fn identity_only_elsewhere(&self, node: &str) -> Option<String> {
        // The far server's account runs only on the far node.
        (self.placement.far != node).then(|| {
            format!(
                "spiffe://{}/ns/{}/sa/{}",
                self.trust_domain,
                probes::namespace(&self.id, Role::Server),
                Role::Server.service_account()
            )
        })
    }

    async fn node_credential(&self, node: &str) -> Result<String, String> {
        let ns = &self.mesh_namespace;
        let pod = ztunnel_pod(&self.client, ns, node).await?;
        let (name, uid) = (
            pod.metadata.name.clone().unwrap_or_default(),
            pod.metadata.uid.clone().unwrap_or_default(),
        );
        let account = pod
            .spec
            .and_then(|s| s.service_account_name)
            .unwrap_or_else(|| "ztunnel".into());
        let request = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": [NODE_AUDIENCE],
                "expirationSeconds": 600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid},
            }
        });
        let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        let http = http::Request::post(format!(
            "/api/v1/namespaces/{ns}/serviceaccounts/{account}/token"
        ))
        .header("content-type", "application/json")
        .body(body)
        .map_err(|e| e.to_string())?;
        let answer: serde_json::Value = self
            .client
            .request(http)
            .await
            .map_err(|e| format!("a token for {ns}/{account} bound to {name}: {e}"))?;
        answer["status"]["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "the TokenRequest returned no token".into())
    }

    async fn connect(&self, from: &Seat, to: SocketAddr, dial: Dial) -> Result<Stream, String> {
        let (pods, name) = self.pods_of(from);
        exec::connect(&pods, &name, to, dial).await
    }

    async fn udp_reaches(&self, from: &Seat, to: &Seat) -> Result<Option<String>, String> {
        let (to_pods, to_name) = self.pods_of(to);
        let log_params = LogParams {
            container: Some("udp".into()),
            ..Default::default()
        };
        let before = to_pods
            .logs(&to_name, &log_params)
            .await
            .map_err(|e| format!("the UDP echo's log in {}: {e}", to.name))?;
        let (from_pods, from_name) = self.pods_of(from);
        let target = SocketAddr::new(to.ip, probes::UDP_PORT);
        let params = kube::api::AttachParams::default()
            .container(exec::CONTAINER)
            .stdout(true)
            .stderr(true)
            .stdin(false);
        let command = [
            exec::PROBE_PROGRAM,
            "udp-send",
            "--to",
            &target.to_string(),
            "--count",
            "3",
            "--wait",
            "300ms",
        ];
        let session = from_pods
            .exec(&from_name, command, &params)
            .await
            .map_err(|e| format!("exec in {}: {e}", from.name))?;
        // Fails when nothing came back, which is what is expected.
        let _ = tokio::time::timeout(crate::TIMEOUT, session.join()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = to_pods
            .logs(&to_name, &log_params)
            .await
            .map_err(|e| format!("the UDP echo's log in {}: {e}", to.name))?;
        Ok(after
            .lines()
            .skip(before.lines().count())
            .find(|l| l.contains("bytes from"))
            .map(|l| format!("the app on {target} received: {}", l.trim())))
    }

    async fn listener(&self, at: &Seat) -> Result<Listener, String> {
        // The server pods run their echo listener from the start.
        Ok(Listener {
            address: SocketAddr::new(at.ip, PROBE_PORT),
            guard: None,
        })
    }

    async fn ztunnel_log(&self, node: &str) -> Result<String, String> {
        let ns = &self.mesh_namespace;
        let pod = ztunnel_pod(&self.client, ns, node).await?;
        let name = pod.metadata.name.unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        pods.logs(
            &name,
            &LogParams {
                container: Some("ztunnel".into()),
                tail_lines: Some(3000),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("log of {ns}/{name}: {e}"))
    }

    async fn ztunnel_open_files(&self, _node: &str) -> Option<usize> {
        // A pod's open files are not visible through the API server.
        None
    }

    async fn apply(&self, yaml: &str) -> Result<(), String> {
        let object = policy_from(yaml)?;
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &namespace, &authorization_policies());
        api.create(&PostParams::default(), &object)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn delete(&self, yaml: &str) -> Result<(), String> {
        let object = policy_from(yaml)?;
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &namespace, &authorization_policies());
        api.delete(&name, &DeleteParams::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())?;
        // Give the ztunnels the change before the next check connects.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    type Capture = ExecCapture;

    async fn fabric_capture(
        &self,
        between: [IpAddr; 2],
    ) -> Result<ExecCapture, CaptureUnavailable> {
        let Some(capture) = self.seat(Role::Capture, Family::of(between[0])) else {
            return Err(CaptureUnavailable::NoVantage(
                "the traffic between nodes is not visible from a pod (--host-network-capture \
                 allows a probe pod on the node's network); the access-log check shows the \
                 bytes arrived over HBONE with the client's identity"
                    .into(),
            ));
        };
        let (pods, name) = self.pods_of(&capture);
        exec::capture(&pods, &name, between)
            .await
            .map_err(CaptureUnavailable::Failed)
    }
}
