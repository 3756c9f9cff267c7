use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use kanava_mesh::{DEFAULT_TRUST_DOMAIN, names, ports};
use kanava_runtime::LogFormat;

/// Configuration of `kanava-control-plane`, from flags or environment.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "kanava-control-plane", version, about)]
pub struct Config {
    /// Directory of Kubernetes manifests (Namespace, Pod, Service) to serve,
    /// watched for changes.
    #[arg(long, env = "KANAVA_MANIFEST_DIR")]
    pub manifest_dir: PathBuf,

    /// Address of the gRPC (TLS) listener for discovery and certificates.
    #[arg(long, env = "KANAVA_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], ports::CONTROL_PLANE)))]
    pub listen: SocketAddr,

    /// Directory holding the CA root (`root-cert.pem`, `root-key.pem`). They
    /// are created on first start and reused afterwards; put your own there
    /// to plug in an existing CA.
    #[arg(long, env = "KANAVA_CA_DIR")]
    pub ca_dir: PathBuf,

    /// File of node credentials, one `<node-name> <token>` per line. A
    /// ztunnel presenting a token acts for that node only.
    #[arg(long, env = "KANAVA_NODE_TOKENS_FILE")]
    pub node_tokens_file: PathBuf,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "KANAVA_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Namespace whose AuthorizationPolicies apply to the whole mesh.
    #[arg(long, env = "KANAVA_ROOT_NAMESPACE", default_value = names::ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Lifetime of workload certificates when the requester asks for none.
    #[arg(long, env = "KANAVA_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,

    /// Longest lifetime a workload certificate may be issued with.
    #[arg(long, env = "KANAVA_MAX_CERT_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: Duration,

    /// DNS names in the control plane's own serving certificate.
    #[arg(long, env = "KANAVA_SERVER_NAMES", value_delimiter = ',', default_value = names::CONTROL_PLANE_SERVER_NAME)]
    pub server_names: Vec<String>,

    /// IP addresses in the control plane's own serving certificate.
    #[arg(long, env = "KANAVA_SERVER_IPS", value_delimiter = ',')]
    pub server_ips: Vec<IpAddr>,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "KANAVA_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Log format.
    #[arg(long, env = "KANAVA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
