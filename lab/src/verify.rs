//! `kanava verify` on a lab: the checks of `kanava-verify`, made from the
//! lab's network namespaces directly. The lab is the one ground that can
//! also watch the fabric between its nodes, so its report has no skipped
//! fabric check.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kanava_mesh::names;
use kanava_verify::{
    CaptureUnavailable, Check, Dial, FabricCapture, Family, Ground, Listener, PROBE_PORT, Packet,
    Seat, Seats, Stream, TIMEOUT,
};

use crate::Lab;
use crate::family::IpFamily;
use crate::state::PodState;

/// Runs every check against `lab`; `progress` sees each as it ends.
pub fn run(lab: &mut Lab, progress: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return vec![Check::new("runtime", "a Tokio runtime").fail(error.to_string())];
        }
    };
    let ground = LabGround {
        lab: RefCell::new(lab),
    };
    runtime.block_on(kanava_verify::run(&ground, progress))
}

/// Whether every check that ran passed.
pub use kanava_verify::all_passed;

struct LabGround<'a> {
    // The checks hold `&self`; only `apply` and `delete` change the lab,
    // never across an await.
    lab: RefCell<&'a mut Lab>,
}

fn family(of: IpFamily) -> Family {
    match of {
        IpFamily::IPv4 => Family::IPv4,
        IpFamily::IPv6 => Family::IPv6,
    }
}

fn ip_of(pod: &PodState, wanted: Family) -> Option<IpAddr> {
    pod.ips.iter().copied().find(|ip| Family::of(*ip) == wanted)
}

fn seat_of(pod: &PodState, ip: IpAddr) -> Seat {
    Seat {
        name: pod.key(),
        node: pod.node.clone(),
        namespace: pod.namespace.clone(),
        ip,
        identity: pod.captured.then(|| pod.identity.clone()),
        http_port: Some(pod.readiness_port.unwrap_or(80)),
    }
}

impl LabGround<'_> {
    /// Namespaces whose enrolled pods refuse plaintext, and those that
    /// accept it.
    fn namespaces_by_mode(&self) -> (Vec<String>, Vec<String>) {
        let lab = self.lab.borrow();
        let objects = crate::manifests::Manifests::new(lab.state().layout().manifest_dir())
            .read()
            .unwrap_or_default();
        let mut by_mode = (Vec::new(), Vec::new());
        for (name, namespace) in &objects.namespaces {
            let permissive = namespace
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::MTLS_MODE_LABEL))
                .is_some_and(|mode| mode == "permissive");
            if permissive {
                by_mode.1.push(name.clone());
            } else {
                by_mode.0.push(name.clone());
            }
        }
        by_mode
    }

    fn node_ip(&self, node: &str, wanted: Family) -> Option<IpAddr> {
        self.lab
            .borrow()
            .state()
            .node(node)?
            .ips
            .iter()
            .copied()
            .find(|ip| Family::of(*ip) == wanted)
    }

    fn node_seat(&self, node: &str, wanted: Family) -> Option<Seat> {
        let ip = self.node_ip(node, wanted)?;
        Some(Seat {
            name: format!("node/{node}"),
            node: node.into(),
            namespace: String::new(),
            ip,
            identity: None,
            http_port: None,
        })
    }
}

impl Ground for LabGround<'_> {
    fn families(&self) -> Vec<Family> {
        self.lab
            .borrow()
            .state()
            .families
            .iter()
            .map(family)
            .collect()
    }

    fn seats(&self, wanted: Family) -> Option<Seats> {
        let (strict, permissive) = self.namespaces_by_mode();
        let lab = self.lab.borrow();
        let enrolled: Vec<&PodState> = lab
            .state()
            .pods
            .iter()
            .filter(|p| p.captured && ip_of(p, wanted).is_some() && p.pid.is_some())
            .collect();
        let local = enrolled
            .iter()
            .find(|p| strict.contains(&p.namespace))
            .or_else(|| enrolled.first())?;
        let client = seat_of(local, ip_of(local, wanted)?);
        let servers = enrolled
            .iter()
            .find(|p| p.node != local.node)
            .and_then(|p| Some(seat_of(p, ip_of(p, wanted)?)))
            .into_iter()
            .collect();
        let impostor = lab
            .state()
            .pods
            .iter()
            .find(|p| p.key() != local.key() && p.identity != local.identity)
            .and_then(|p| Some(seat_of(p, ip_of(p, wanted)?)));
        let permissive = enrolled
            .iter()
            .find(|p| permissive.contains(&p.namespace))
            .and_then(|p| Some(seat_of(p, ip_of(p, wanted)?)));
        // Plaintext comes from a node other than the client's (the local
        // one in a one-node lab).
        let other = lab
            .state()
            .nodes
            .iter()
            .find(|n| n.name != local.node)
            .or_else(|| lab.state().nodes.first())?
            .name
            .clone();
        let client_is_strict = strict.contains(&local.namespace);
        let client_node = local.node.clone();
        drop(lab);
        Some(Seats {
            family: wanted,
            client,
            client_is_strict,
            servers,
            impostor,
            outsider: self.node_seat(&other, wanted)?,
            node_side: self.node_seat(&client_node, wanted)?,
            permissive,
        })
    }

    async fn ztunnel_addresses(&self, node: &str, wanted: Family) -> Vec<IpAddr> {
        // The lab's ztunnels run in their node's namespace.
        self.node_ip(node, wanted).into_iter().collect()
    }

    fn control_plane(&self) -> SocketAddr {
        SocketAddr::new(
            self.lab.borrow().state().control_plane_address().ip(),
            kanava_mesh::ports::CONTROL_PLANE,
        )
    }

    fn mesh_roots(&self) -> Result<kanava_tls::MeshRoots, String> {
        crate::clients::mesh_roots(&self.lab.borrow())
    }

    fn identity_only_elsewhere(&self, node: &str) -> Option<String> {
        let lab = self.lab.borrow();
        let pods = &lab.state().pods;
        pods.iter()
            .filter(|p| p.captured && p.node != node)
            .map(|p| p.identity.clone())
            .find(|identity| {
                !pods
                    .iter()
                    .any(|p| p.node == node && &p.identity == identity)
            })
    }

    async fn node_credential(&self, node: &str) -> Result<String, String> {
        self.lab
            .borrow()
            .node_token(node)
            .map_err(|e| e.to_string())
    }

    async fn connect(&self, from: &Seat, to: SocketAddr, dial: Dial) -> Result<Stream, String> {
        let lab = self.lab.borrow();
        let stream = match dial.spoofed_source {
            None => lab.connect(&from.name, to, TIMEOUT),
            Some(source) => connect_spoofed(&lab, &from.name, source, to),
        };
        Ok(Box::new(crate::clients::tokio_stream_from(stream)?))
    }

    async fn udp_reaches(&self, from: &Seat, to: &Seat) -> Result<Option<String>, String> {
        let lab = self.lab.borrow();
        let listen = SocketAddr::new(to.ip, PROBE_PORT);
        let receiver = lab
            .udp_socket(&to.name, listen)
            .map_err(|e| format!("a listener in the pod: {e}"))?;
        let unspecified = match to.ip {
            IpAddr::V4(_) => IpAddr::from([0u8; 4]),
            IpAddr::V6(_) => IpAddr::from([0u16; 8]),
        };
        let sender = lab
            .udp_socket(&from.name, SocketAddr::new(unspecified, 0))
            .map_err(|e| format!("a sender on {}: {e}", from.name))?;
        for _ in 0..3 {
            sender
                .send_to(b"KANAVA-VERIFY-UDP", listen)
                .map_err(|e| format!("send from {}: {e}", from.name))?;
        }
        let _ = receiver.set_read_timeout(Some(Duration::from_millis(700)));
        let mut buffer = [0u8; 64];
        Ok(receiver
            .recv_from(&mut buffer)
            .ok()
            .map(|(n, peer)| format!("{n} bytes from {peer} reached {listen}")))
    }

    async fn listener(&self, at: &Seat) -> Result<Listener, String> {
        let lab = self.lab.borrow();
        let pod = lab
            .state()
            .pods
            .iter()
            .find(|p| p.key() == at.name)
            .cloned()
            .ok_or_else(|| format!("no pod {}", at.name))?;
        let argv: Vec<String> = [
            crate::bin_dir(None)
                .map_err(|e| e.to_string())?
                .join("labapp")
                .display()
                .to_string(),
            "echo".into(),
            "--port".into(),
            PROBE_PORT.to_string(),
        ]
        .into();
        let log = lab.state().layout().dir.join("verify-probe.log");
        let pid =
            crate::process::spawn_in(&pod.netns, &argv, &[], &log).map_err(|e| e.to_string())?;
        let probe = Probe { pid };
        let address = SocketAddr::new(at.ip, PROBE_PORT);
        // Asked on the pod's loopback, which the capture leaves alone: from
        // anywhere else the ztunnel would take the connection whether the
        // listener is up or not.
        let loopback = SocketAddr::from(([127, 0, 0, 1], PROBE_PORT));
        let deadline = Instant::now() + TIMEOUT;
        while lab.connect(&pod.key(), loopback, TIMEOUT).is_err() {
            if Instant::now() > deadline {
                return Err(format!("the probe listener in {} did not start", at.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Listener {
            address,
            guard: Some(Box::new(probe)),
        })
    }

    async fn ztunnel_log(&self, node: &str) -> Result<String, String> {
        self.lab
            .borrow()
            .logs(&format!("ztunnel/{node}"))
            .map_err(|e| e.to_string())
    }

    async fn ztunnel_open_files(&self, node: &str) -> Option<usize> {
        let pid = self.lab.borrow().state().node(node)?.ztunnel.pid?;
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(Iterator::count)
    }

    async fn apply(&self, yaml: &str) -> Result<(), String> {
        self.lab
            .borrow_mut()
            .apply(yaml)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn delete(&self, yaml: &str) -> Result<(), String> {
        self.lab
            .borrow_mut()
            .delete(yaml)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    type Capture = crate::capture::Capture;

    async fn fabric_capture(
        &self,
        _between: [IpAddr; 2],
    ) -> Result<Self::Capture, CaptureUnavailable> {
        // tcpdump on the fabric bridge sees every node-to-node packet.
        crate::capture::Capture::start(&self.lab.borrow())
            .map_err(|e| CaptureUnavailable::Failed(format!("tcpdump: {e}")))
    }
}

/// A connection from `target`'s namespace bound to `source` with
/// `IP_TRANSPARENT`: a pod forging another's address.
fn connect_spoofed(
    lab: &Lab,
    target: &str,
    source: IpAddr,
    to: SocketAddr,
) -> Result<std::net::TcpStream, crate::Error> {
    let netns = kanava_netns::NetNs::named(&lab.netns(target)?)?;
    netns
        .run(move || kanava_verify::connect_spoofed(source, to, Duration::from_secs(2)))?
        .map_err(crate::Error::io(format!(
            "connect from {target} as {source}"
        )))
}

/// The echo listener in a server pod, stopped when dropped.
struct Probe {
    pid: u32,
}

impl Drop for Probe {
    fn drop(&mut self) {
        crate::process::terminate(&[self.pid], Duration::from_secs(2));
    }
}

impl FabricCapture for crate::capture::Capture {
    async fn stop(self) -> Result<Vec<Packet>, String> {
        crate::capture::Capture::stop(self).map_err(|e| e.to_string())
    }
}
