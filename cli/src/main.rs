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
//! ```

mod lab;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(command) => lab::run(command),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}
