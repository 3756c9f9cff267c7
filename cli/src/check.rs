//! `kanava check [--pre]`: whether a cluster can run the mesh (before an
//! install) and whether the mesh it runs is whole (after), each finding
//! with its fix.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kanava_verify::check::{self, Options};
use kanava_verify::node_facts::{Finding, Severity};

use crate::lab::{Output, table};

#[derive(Args)]
pub struct CheckArgs {
    /// Before an install: only what the cluster must offer.
    #[arg(long)]
    pre: bool,
    /// The cluster's kubeconfig.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The namespace Kanava is (or will be) installed in.
    #[arg(long, default_value = kanava_mesh::names::SYSTEM_NAMESPACE)]
    namespace: String,
    #[command(flatten)]
    probe: crate::verify::ProbeImage,
    /// The nodes' CNI configuration directory (the chart's cni.confDir).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: String,
    /// The nodes' CNI plugin directory (the chart's cni.binDir).
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: String,
    /// The nodes' network namespace directory (the chart's netnsDir).
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: String,
    /// How long the node probes may take.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// A finding and where it was made (the cluster, or a node).
#[derive(serde::Serialize)]
struct Located {
    #[serde(rename = "where")]
    place: String,
    #[serde(flatten)]
    finding: Finding,
}

pub fn run(args: &CheckArgs) -> anyhow::Result<i32> {
    let options = Options {
        mesh_namespace: args.namespace.clone(),
        image: args.probe.image.clone(),
        pull_policy: args.probe.image_pull_policy.clone(),
        cni_conf_dir: args.cni_conf_dir.clone(),
        cni_bin_dir: args.cni_bin_dir.clone(),
        netns_dir: args.netns_dir.clone(),
        ready_within: args.timeout,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut found = runtime.block_on(cluster_and_nodes(args, &options))?;
    if !args.pre {
        // Its own runtime: read after the one above is done.
        match crate::cluster::status(&args.kubeconfig, &args.namespace, Duration::from_secs(15)) {
            Ok(health) => found.extend(mesh_findings(&health, &runtime, args)?),
            Err(error) => found.push(Located {
                place: "cluster".into(),
                finding: Finding::error(
                    "the mesh",
                    format!("{error:#}"),
                    "kanava status --kubeconfig ... says more",
                ),
            }),
        }
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
        Output::Table => print!("{}", report(&found)),
    }
    Ok(
        if found.iter().any(|f| f.finding.severity == Severity::Error) {
            1
        } else {
            0
        },
    )
}

async fn cluster_and_nodes(args: &CheckArgs, options: &Options) -> anyhow::Result<Vec<Located>> {
    let client = kanava_verify::cluster::client(Some(&args.kubeconfig), None)
        .await
        .map_err(anyhow::Error::msg)?;
    let at_cluster = |finding| Located {
        place: "cluster".into(),
        finding,
    };
    let mut found = vec![at_cluster(check::api_server_version(&client).await)];
    if args.pre {
        found.push(at_cluster(check::install_permissions(&client).await));
    }
    let id = kanava_verify::cluster::new_run_id();
    eprintln!("reading every node with a probe pod (namespace kanava-check-{id})");
    let facts = tokio::select! {
        facts = check::node_facts(&client, options, &id) => facts,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
    };
    let _ = check::remove(&client, &id, Duration::from_secs(60)).await;
    let facts = facts.map_err(anyhow::Error::msg)?;
    for (node, facts) in facts {
        let installed = if args.pre {
            None
        } else {
            Some(
                kanava_verify::cluster::ztunnel_pod(&client, &args.namespace, &node)
                    .await
                    .is_ok(),
            )
        };
        match facts {
            Ok(facts) => {
                found.extend(
                    facts
                        .findings(installed)
                        .into_iter()
                        .map(|finding| Located {
                            place: node.clone(),
                            finding,
                        }),
                )
            }
            Err(error) => found.push(Located {
                place: node.clone(),
                finding: Finding::error(
                    "node probe",
                    error,
                    "the probe pod could not run there: kubectl describe node; or \
                     --image for an image the node can pull",
                ),
            }),
        }
    }
    Ok(found)
}

/// The running mesh, from `kanava status`'s reading, and the pods each
/// node should capture.
fn mesh_findings(
    health: &crate::health::Health,
    runtime: &tokio::runtime::Runtime,
    args: &CheckArgs,
) -> anyhow::Result<Vec<Located>> {
    let mut found = vec![Located {
        place: "cluster".into(),
        finding: if health.control_plane_ready {
            Finding::ok("control plane", "ready, cluster read in full")
        } else {
            Finding::error(
                "control plane",
                health.problems.join("; "),
                format!(
                    "kubectl -n {} logs deployment/kanava-control-plane",
                    args.namespace
                ),
            )
        },
    }];
    let expected = runtime.block_on(async {
        let client = kanava_verify::cluster::client(Some(&args.kubeconfig), None).await?;
        check::enrolled_pods_by_node(&client).await
    });
    let expected = expected.map_err(anyhow::Error::msg)?;
    for ztunnel in &health.ztunnels {
        let place = ztunnel.node.clone();
        found.push(Located {
            place: place.clone(),
            finding: if ztunnel.ready && ztunnel.problems.is_empty() {
                Finding::ok(
                    "ztunnel",
                    format!(
                        "{} ready, subscribed, next certificate expiry {}",
                        ztunnel.process,
                        ztunnel.next_expiry.as_deref().unwrap_or("-")
                    ),
                )
            } else {
                Finding::error(
                    "ztunnel",
                    format!("{}: {}", ztunnel.process, ztunnel.problems.join("; ")),
                    "kanava status --kubeconfig ... and the ztunnel pod's log",
                )
            },
        });
        let should = expected.get(&ztunnel.node).copied().unwrap_or(0);
        found.push(Located {
            place,
            finding: if ztunnel.captured >= should {
                Finding::ok(
                    "enrolled pods captured",
                    format!("{} of {should}", ztunnel.captured.min(should)),
                )
            } else {
                Finding::error(
                    "enrolled pods captured",
                    format!("{} of {should}", ztunnel.captured),
                    "pods of enrolled namespaces run uncaptured here: restart them \
                     (kubectl rollout restart) so the CNI plugin captures them, and see \
                     the ztunnel's log",
                )
            },
        });
    }
    Ok(found)
}

fn report(found: &[Located]) -> String {
    let mut rows = vec![vec![
        "WHERE".to_string(),
        "CHECK".into(),
        "RESULT".into(),
        "OBSERVED".into(),
    ]];
    for located in found {
        rows.push(vec![
            located.place.clone(),
            located.finding.what.clone(),
            match located.finding.severity {
                Severity::Ok => "ok",
                Severity::Warning => "warning",
                Severity::Error => "ERROR",
            }
            .into(),
            located.finding.observed.clone(),
        ]);
    }
    let mut text = table(&rows);
    let problems: Vec<&Located> = found
        .iter()
        .filter(|f| f.finding.severity != Severity::Ok)
        .collect();
    text.push_str(&format!(
        "\n{} checks: {} errors, {} warnings\n",
        found.len(),
        problems
            .iter()
            .filter(|f| f.finding.severity == Severity::Error)
            .count(),
        problems
            .iter()
            .filter(|f| f.finding.severity == Severity::Warning)
            .count()
    ));
    for located in problems {
        if let Some(fix) = &located.finding.fix {
            text.push_str(&format!(
                "\n{} on {}:\n  fix: {fix}\n",
                located.finding.what, located.place
            ));
        }
    }
    text
}
