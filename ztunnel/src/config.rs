use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kanava_mesh::{DEFAULT_TRUST_DOMAIN, names, ports};
use kanava_runtime::LogFormat;

/// Configuration of `ztunnel`, from flags or environment.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "ztunnel", version, about)]
pub struct Config {
    /// Name of the node this ztunnel serves.
    #[arg(long, env = "KANAVA_NODE_NAME")]
    pub node_name: String,

    /// Control plane gRPC address, `host:port`.
    #[arg(long, env = "KANAVA_CONTROL_PLANE_ADDRESS")]
    pub control_plane_address: String,

    /// Name the control plane's certificate must carry.
    #[arg(long, env = "KANAVA_CONTROL_PLANE_NAME", default_value = names::CONTROL_PLANE_SERVER_NAME)]
    pub control_plane_name: String,

    /// PEM file with the mesh root certificate(s).
    #[arg(long, env = "KANAVA_CA_ROOT_FILE")]
    pub ca_root_file: PathBuf,

    /// File holding this node's credential for the control plane.
    #[arg(long, env = "KANAVA_NODE_TOKEN_FILE")]
    pub node_token_file: PathBuf,

    /// Unix socket on which pods are handed over.
    #[arg(
        long,
        env = "KANAVA_HANDOFF_SOCKET",
        default_value = "/var/run/kanava/ztunnel.sock"
    )]
    pub handoff_socket: PathBuf,

    /// Unix socket on which a ready ztunnel takes over from the one before it
    /// during an upgrade (listeners, open connections).
    #[arg(
        long,
        env = "KANAVA_UPGRADE_SOCKET",
        default_value = "/var/run/kanava/ztunnel-upgrade.sock"
    )]
    pub upgrade_socket: PathBuf,

    /// Directory of the pod records the CNI plugin keeps on this node: how
    /// the ztunnel finds the enrolled pods that already run when it starts,
    /// and running pods whose namespace is enrolled later.
    #[arg(
        long,
        env = "KANAVA_POD_RECORDS_DIR",
        default_value = "/var/run/kanava/pods"
    )]
    pub pod_records_dir: PathBuf,

    /// Where the node keeps pods' network namespaces (containerd, CRI-O):
    /// searched for a pod that joins the mesh without a record.
    #[arg(long, env = "KANAVA_NETNS_DIR", default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,

    /// A user id besides root allowed to hand pods over (checked on every
    /// connection with the kernel's SO_PEERCRED), e.g. a CNI agent's.
    #[arg(long, env = "KANAVA_HANDOFF_ALLOWED_UID")]
    pub handoff_allowed_uid: Option<u32>,

    /// After SIGTERM, how long the ztunnel goes on serving before it exits.
    /// With a successor ready beside it (an upgrade), it hands its
    /// connections over and then drains, for at most this long, those that
    /// cannot move; without one, it serves this long (connections in flight,
    /// and the handoff socket, through which an uninstall releases the
    /// node's pods).
    #[arg(long, env = "KANAVA_TERMINATION_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub termination_grace: std::time::Duration,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "KANAVA_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Admin API (configuration dump); keep it on localhost.
    #[arg(long, env = "KANAVA_ADMIN_ADDRESS", default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)))]
    pub admin_address: SocketAddr,

    /// Prometheus metrics endpoint (`/metrics`).
    #[arg(long, env = "KANAVA_METRICS_ADDRESS", default_value_t = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], ports::METRICS)))]
    pub metrics_address: SocketAddr,

    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "KANAVA_READINESS_ADDRESS", default_value_t = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], ports::READINESS)))]
    pub readiness_address: SocketAddr,

    /// Lifetime to ask for workload certificates; unset asks for the CA's
    /// default. Certificates are renewed at half-life.
    #[arg(long, env = "KANAVA_CERT_TTL", value_parser = humantime::parse_duration)]
    pub cert_ttl: Option<Duration>,

    /// Most concurrent HTTP/2 CONNECT streams on one HBONE connection, in
    /// each direction.
    #[arg(long, env = "KANAVA_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: u32,

    /// An outbound HBONE connection with no streams is closed after this long.
    #[arg(long, env = "KANAVA_POOL_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub pool_idle_timeout: Duration,

    /// Bound on establishing any upstream connection (TCP + TLS + CONNECT).
    #[arg(long, env = "KANAVA_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Largest HTTP/2 header block accepted on HBONE.
    #[arg(long, env = "KANAVA_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,

    /// Most connections one pod may have open through the ztunnel in each
    /// direction (those it opened; those opened to it).
    #[arg(long, env = "KANAVA_MAX_CONNECTIONS_PER_POD", default_value_t = 16_384)]
    pub max_connections_per_pod: usize,

    /// Most inbound TLS handshakes in progress at once, across all pods.
    #[arg(long, env = "KANAVA_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    pub max_pending_handshakes: usize,

    /// Most inbound TLS handshakes in progress at once from one source
    /// address: one pod cannot take the node's whole budget.
    #[arg(
        long,
        env = "KANAVA_MAX_PENDING_HANDSHAKES_PER_SOURCE",
        default_value_t = 32
    )]
    pub max_pending_handshakes_per_source: usize,

    /// Most inbound TLS handshakes in progress at once to one pod.
    #[arg(
        long,
        env = "KANAVA_MAX_PENDING_HANDSHAKES_PER_POD",
        default_value_t = 256
    )]
    pub max_pending_handshakes_per_pod: usize,

    /// Longest an inbound HBONE handshake (TLS and the HTTP/2 preface) may
    /// take before the connection is closed.
    #[arg(long, env = "KANAVA_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Largest discovery or certificate message accepted, in bytes.
    #[arg(long, env = "KANAVA_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Data-path worker threads, each with a runtime of its own that
    /// carries its connections from accept to end (the control path runs
    /// on the main thread).
    #[arg(long, env = "KANAVA_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// Log format.
    #[arg(long, env = "KANAVA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
