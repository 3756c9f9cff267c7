//! `kanava verify`: runs the isolation checks against a lab, or with
//! `--kubeconfig` against a live cluster, shows each check as it ends, then
//! prints what each expected and observed, and the fix for each failure.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kanava_lab::Lab;
use kanava_verify::cluster::{self, ClusterGround, Options};
use kanava_verify::{Check, all_passed};

use crate::lab::{Output, table};

#[derive(Args)]
pub struct VerifyArgs {
    /// The lab to verify (default: the only one running).
    #[arg(long, conflicts_with_all = ["kubeconfig", "context"])]
    name: Option<String>,
    /// Verify a live cluster instead of a lab: its kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig's context (default: its current one).
    #[arg(long, requires = "kubeconfig")]
    context: Option<String>,
    /// On a cluster: the namespace Kanava is installed in.
    #[arg(long, default_value = kanava_mesh::names::SYSTEM_NAMESPACE)]
    namespace: String,
    #[command(flatten)]
    probe: ProbeImage,
    /// On a cluster: let a probe pod run on the client's node's own network
    /// with CAP_NET_RAW, to capture what crosses between the nodes (the
    /// fabric check; skipped without it).
    #[arg(long, requires = "kubeconfig")]
    host_network_capture: bool,
    /// How long the probe pods may take to start.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// Bound on the whole run on a cluster; what it made is removed after.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The image of the probe pods `verify` and `check` place on a cluster.
#[derive(Args)]
pub struct ProbeImage {
    /// On a cluster: the probe pods' image (the test app, `labapp`).
    #[arg(long, default_value = concat!("docker.io/kanava/kanava-testapp:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// On a cluster: the probe pods' image pull policy (Never for images
    /// loaded by hand).
    #[arg(long, default_value = "IfNotPresent")]
    pub image_pull_policy: String,
}

pub fn run(args: &VerifyArgs) -> anyhow::Result<i32> {
    let mut progress = |check: &Check| {
        eprintln!(
            "  {:7} {} — {}",
            verdict(check),
            check.title(),
            check.observed
        );
    };
    let checks = match &args.kubeconfig {
        None => {
            let mut lab = Lab::attach(args.name.as_deref())?;
            eprintln!("verifying lab {}", lab.name());
            kanava_lab::verify::run(&mut lab, &mut progress)
        }
        Some(kubeconfig) => {
            let options = Options {
                kubeconfig: Some(kubeconfig.clone()),
                context: args.context.clone(),
                mesh_namespace: args.namespace.clone(),
                image: args.probe.image.clone(),
                pull_policy: args.probe.image_pull_policy.clone(),
                ready_within: args.ready_timeout,
                host_network_capture: args.host_network_capture,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match runtime.block_on(on_cluster(&options, args.timeout, &mut progress))? {
                Some(checks) => checks,
                None => return Ok(130),
            }
        }
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Output::Table => print!("{}", report(&checks)),
    }
    Ok(if all_passed(&checks) { 0 } else { 1 })
}

/// Places the probes, runs the checks and removes the probes again, also
/// after Ctrl-C (`None`), a timeout or a failed step.
async fn on_cluster(
    options: &Options,
    timeout: Duration,
    progress: &mut dyn FnMut(&Check),
) -> anyhow::Result<Option<Vec<Check>>> {
    let client = cluster::client(options.kubeconfig.as_deref(), options.context.as_deref())
        .await
        .map_err(anyhow::Error::msg)?;
    let id = cluster::new_run_id();
    eprintln!(
        "verifying the mesh in namespace {} of the cluster of {} (run {id})",
        options.mesh_namespace,
        options.kubeconfig.as_deref().map_or_else(
            || "the default kubeconfig".into(),
            |p| p.display().to_string()
        )
    );
    let work = async {
        let mut say = |line: &str| eprintln!("{line}");
        let (ground, mut checks) = ClusterGround::prepare(client.clone(), options, &id, &mut say)
            .await
            .map_err(anyhow::Error::msg)?;
        for check in &checks {
            progress(check);
        }
        checks.extend(kanava_verify::run(&ground, progress).await);
        anyhow::Ok(checks)
    };
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(timeout, work) => match outcome {
            Ok(result) => result.map(Some),
            Err(_) => Err(anyhow::anyhow!("not done within {} (--timeout)", humantime::format_duration(timeout))),
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            Ok(None)
        }
    };
    eprintln!("removing the probe namespaces of run {id}");
    let removal = tokio::select! {
        removal = cluster::probes::remove(&client, &id, Duration::from_secs(90)) => removal,
        _ = tokio::signal::ctrl_c() => Err("interrupted again".to_string()),
    };
    match removal {
        Ok((_, left)) if left.is_empty() => eprintln!("removed"),
        Ok((_, left)) => eprintln!(
            "still terminating: {} (kubectl get ns -l {}={id})",
            left.join(", "),
            cluster::probes::RUN_LABEL
        ),
        Err(error) => eprintln!(
            "could not remove them: {error}\n  kubectl delete namespace -l {}={id}",
            cluster::probes::RUN_LABEL
        ),
    }
    outcome
}

fn verdict(check: &Check) -> &'static str {
    match check.passed {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "skipped",
    }
}

fn report(checks: &[Check]) -> String {
    let mut rows = vec![vec![
        "CHECK".to_string(),
        "EXPECTED".into(),
        "OBSERVED".into(),
        "RESULT".into(),
    ]];
    for check in checks {
        rows.push(vec![
            check.title(),
            check.expected.clone(),
            check.observed.clone(),
            verdict(check).into(),
        ]);
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| c.passed == Some(false)).collect();
    let mut text = format!(
        "{}\n{} checks: {} passed, {} failed, {} skipped\n",
        table(&rows),
        checks.len(),
        checks.iter().filter(|c| c.passed == Some(true)).count(),
        failed.len(),
        checks.iter().filter(|c| c.passed.is_none()).count()
    );
    for check in failed {
        if let Some(fix) = &check.fix {
            text.push_str(&format!("\n{}:\n  fix: {fix}\n", check.title()));
        }
    }
    text
}
