use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use kanava_mesh::{DEFAULT_TRUST_DOMAIN, names, ports};
use kanava_runtime::LogFormat;

use crate::Error;

/// Configuration of `kanava-control-plane`, from flags or environment.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "kanava-control-plane", version, about)]
pub struct Config {
    /// Where the cluster's objects come from: `kubernetes` (the API server)
    /// or `manifests` (a directory). Default: `manifests` when
    /// `--manifest-dir` is given, `kubernetes` otherwise.
    #[arg(long, env = "KANAVA_SOURCE", value_enum)]
    pub source: Option<SourceKind>,

    /// Kubernetes: a kubeconfig file to reach the API server with. Default:
    /// the in-cluster configuration (service-account token and
    /// `KUBERNETES_SERVICE_HOST`).
    #[arg(long, env = "KANAVA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes: the control plane's own namespace, where its CA Secret,
    /// root ConfigMap and the ztunnels' service account live.
    #[arg(long, env = "POD_NAMESPACE", default_value = names::SYSTEM_NAMESPACE)]
    pub namespace: String,

    /// Kubernetes: the Secret (in `--namespace`) of an operator-supplied
    /// plug-in CA; when it exists the control plane signs with it.
    #[arg(long, env = "KANAVA_PLUGIN_CA_SECRET", default_value = names::PLUGIN_CA_SECRET)]
    pub plugin_ca_secret: String,

    /// Kubernetes: the service account (in `--namespace`) that ztunnels run
    /// as; a token of any other account is refused.
    #[arg(long, env = "KANAVA_ZTUNNEL_SERVICE_ACCOUNT", default_value = names::ZTUNNEL_SERVICE_ACCOUNT)]
    pub ztunnel_service_account: String,

    /// Kubernetes: the audience ztunnel tokens must be issued for.
    #[arg(long, env = "KANAVA_TOKEN_AUDIENCE", default_value = names::TOKEN_AUDIENCE)]
    pub token_audience: String,

    /// Kubernetes: name of this replica (its pod), for the Events it writes.
    #[arg(long, env = "POD_NAME", default_value = "kanava-control-plane")]
    pub pod_name: String,

    /// Manifests: directory of Kubernetes manifests (Namespace, Pod,
    /// Service, AuthorizationPolicy) to serve, watched for changes.
    #[arg(long, env = "KANAVA_MANIFEST_DIR")]
    pub manifest_dir: Option<PathBuf>,

    /// Manifests: directory holding the CA: `root-cert.pem` and
    /// `root-key.pem`, created on first start and reused afterwards; or a
    /// plug-in CA's `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` and
    /// optionally `cert-chain.pem`.
    #[arg(long, env = "KANAVA_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Manifests: file of node credentials, one `<node-name> <token>` per
    /// line. A ztunnel presenting a token acts for that node only.
    #[arg(long, env = "KANAVA_NODE_TOKENS_FILE")]
    pub node_tokens_file: Option<PathBuf>,

    /// Address of the gRPC (TLS) listener for discovery and certificates.
    #[arg(long, env = "KANAVA_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], ports::CONTROL_PLANE)))]
    pub listen: SocketAddr,

    /// Address of the readiness endpoint (`GET /ready`: 200 once the source
    /// has been read in full, 503 before). Default: port 15014 on all
    /// addresses with `--source kubernetes`, none with manifests.
    #[arg(long, env = "KANAVA_READINESS_LISTEN")]
    pub readiness_listen: Option<SocketAddr>,

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

    /// Kubernetes: how often the API server's service-account signing keys
    /// (`/openid/v1/jwks`) are fetched again; the last ones fetched are kept
    /// through an API server outage.
    #[arg(long, env = "KANAVA_JWKS_REFRESH_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub jwks_refresh_interval: Duration,

    /// How often the CA's material (its directory, or its Secrets) is read
    /// again, so a root rotation needs no restart.
    #[arg(long, env = "KANAVA_CA_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ca_reload_interval: Duration,

    /// DNS names in the control plane's own serving certificate.
    #[arg(long, env = "KANAVA_SERVER_NAMES", value_delimiter = ',', default_value = names::CONTROL_PLANE_SERVER_NAME)]
    pub server_names: Vec<String>,

    /// IP addresses in the control plane's own serving certificate.
    #[arg(long, env = "KANAVA_SERVER_IPS", value_delimiter = ',')]
    pub server_ips: Vec<IpAddr>,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "KANAVA_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// From how many resources (pods, Services and policies) on, a ztunnel
    /// that can learn workloads on demand is sent only its own node's
    /// workloads, the Services without endpoints and the policies, and asks
    /// for the rest when it needs it. Below, every ztunnel holds everything.
    #[arg(long, env = "KANAVA_ON_DEMAND_ABOVE", default_value_t = 5000)]
    pub on_demand_above: usize,

    /// Log format.
    #[arg(long, env = "KANAVA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The source of cluster objects, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    Kubernetes,
    Manifests,
}

/// The source and what it needs, checked: every flag a source requires is
/// there, and none of another source's is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Kubernetes {
        kubeconfig: Option<PathBuf>,
    },
    Manifests {
        dir: PathBuf,
        ca_dir: PathBuf,
        node_tokens_file: PathBuf,
    },
}

impl Config {
    /// The source this configuration asks for, or what is missing for it.
    pub fn source(&self) -> Result<Source, Error> {
        let kind = self.source.unwrap_or(if self.manifest_dir.is_some() {
            SourceKind::Manifests
        } else {
            SourceKind::Kubernetes
        });
        let bad = |reason: String| Error::Config(reason);
        match kind {
            SourceKind::Kubernetes => {
                let foreign: Vec<&str> = [
                    ("--manifest-dir", self.manifest_dir.is_some()),
                    ("--ca-dir", self.ca_dir.is_some()),
                    ("--node-tokens-file", self.node_tokens_file.is_some()),
                ]
                .into_iter()
                .filter_map(|(flag, set)| set.then_some(flag))
                .collect();
                if !foreign.is_empty() {
                    return Err(bad(format!(
                        "{} only apply to --source manifests; with --source kubernetes the CA \
                         lives in a Secret and ztunnels authenticate with TokenReview",
                        foreign.join(", ")
                    )));
                }
                Ok(Source::Kubernetes {
                    kubeconfig: self.kubeconfig.clone(),
                })
            }
            SourceKind::Manifests => {
                if self.kubeconfig.is_some() {
                    return Err(bad(
                        "--kubeconfig only applies to --source kubernetes".into()
                    ));
                }
                let need = |value: &Option<PathBuf>, flag: &str| {
                    value
                        .clone()
                        .ok_or_else(|| bad(format!("--source manifests needs {flag}")))
                };
                Ok(Source::Manifests {
                    dir: need(&self.manifest_dir, "--manifest-dir")?,
                    ca_dir: need(&self.ca_dir, "--ca-dir")?,
                    node_tokens_file: need(&self.node_tokens_file, "--node-tokens-file")?,
                })
            }
        }
    }

    /// Where readiness is served, if anywhere.
    pub fn readiness_address(&self, source: &Source) -> Option<SocketAddr> {
        self.readiness_listen.or(match source {
            Source::Kubernetes { .. } => Some(SocketAddr::from((
                [0, 0, 0, 0, 0, 0, 0, 0],
                ports::CONTROL_PLANE_READINESS,
            ))),
            Source::Manifests { .. } => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("kanava-control-plane").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn the_source_follows_the_flags_given() {
        assert_eq!(
            parse(&[]).source().unwrap(),
            Source::Kubernetes { kubeconfig: None }
        );
        let manifests = parse(&[
            "--manifest-dir",
            "m",
            "--ca-dir",
            "c",
            "--node-tokens-file",
            "t",
        ]);
        assert!(matches!(
            manifests.source().unwrap(),
            Source::Manifests { .. }
        ));
        assert_eq!(
            manifests.readiness_address(&manifests.source().unwrap()),
            None
        );
    }

    #[test]
    fn a_source_missing_what_it_needs_is_refused_by_name() {
        let err = parse(&["--manifest-dir", "m"]).source().unwrap_err();
        assert!(err.to_string().contains("--ca-dir"), "{err}");
        let err = parse(&["--source", "kubernetes", "--ca-dir", "c"])
            .source()
            .unwrap_err();
        assert!(err.to_string().contains("--ca-dir only apply"), "{err}");
        let err = parse(&["--source", "manifests", "--kubeconfig", "k"])
            .source()
            .unwrap_err();
        assert!(err.to_string().contains("--kubeconfig"), "{err}");
    }
}
