//! `kanava`: the operator's command line.
//!
//! ```text
//! kanava lab up -f FILE [--name NAME] [--nodes N] [--log-filter FILTER]
//! kanava lab apply [--name NAME] -f FILE
//! kanava lab delete [--name NAME] -f FILE
//! kanava lab status [--name NAME] [--output table|json]
//! kanava lab exec [--name NAME] TARGET -- CMD ARGS...
//! kanava lab ip [--name NAME] NAMESPACE/POD
//! kanava lab logs [--name NAME] TARGET
//! kanava lab down [--name NAME | --all]
//! kanava lab clean
//! kanava verify [--name NAME | --kubeconfig FILE [--context C] [--image IMAGE]] [--output table|json]
//! kanava check [--pre] --kubeconfig FILE [--image IMAGE] [--output table|json]
//! kanava ca rotate [--name NAME] [--step-timeout 60s] [--output table|json]
//! kanava status [--name NAME | --kubeconfig FILE [--namespace NS]] [--output table|json]
//! kanava config-dump [--name NAME] NODE [--output table|json]
//! ```

mod ca;
mod check;
mod cluster;
mod health;
mod lab;
mod observe;
mod verify;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kanava", version, about = "Kanava, a sidecarless service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A local cluster of network namespaces running the mesh (needs root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Check, from inside pods, that the mesh isolates and encrypts: the
    /// ztunnel's ports, the control plane, plaintext, foreign certificates,
    /// other nodes' identities, self-loops, spoofing, the fabric, policy
    /// changes. On a lab (needs root), or with --kubeconfig on a live
    /// cluster, from probe pods in temporary namespaces that are removed
    /// after. Exits 1 if any check fails, naming the fix.
    Verify(verify::VerifyArgs),
    /// Whether a cluster can run the mesh (--pre, before an install) and
    /// whether the mesh it runs is whole: Kubernetes version, permissions,
    /// each node's kernel, mounts and CNI configuration, the ztunnels and
    /// the pods they capture. Exits 1 on an error, naming the fix.
    Check(check::CheckArgs),
    /// Health of the mesh in a lab (or, with --kubeconfig, on a cluster):
    /// per node, whether its ztunnel runs and is ready, its discovery
    /// version against the control plane's, the pods it captures and its
    /// certificates' expiry. Exits 1, naming the fix, when something is off.
    Status(observe::StatusArgs),
    /// The mesh's certificate authority (rotate a lab's root).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// What one node's ztunnel holds: captured pods, workloads, services,
    /// policies, certificates with expiry (never keys).
    ConfigDump(observe::ConfigDumpArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(command) => lab::run(command),
        Command::Verify(args) => verify::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Status(args) => observe::status_command(&args),
        Command::ConfigDump(args) => observe::config_dump_command(&args),
        Command::Ca(command) => ca::run(command),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}
