//! `kanava ca`: the mesh's certificate authority.

use clap::{Args, Subcommand};
use kanava_lab::Lab;

use crate::lab::{LabName, Output, table};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Replace a lab's mesh root while traffic flows, with no restart and
    /// no failed connection: trust the new root beside the old, sign with
    /// it and wait until every workload certificate is replaced, then drop
    /// the old root (and delete its key). Each step waits for every
    /// ztunnel. On a cluster, edit the CA's Secret in the same three steps
    /// (README, "Rotating the mesh root").
    Rotate(RotateArgs),
}

#[derive(Args)]
pub struct RotateArgs {
    #[command(flatten)]
    lab: LabName,
    /// Longest wait for every ztunnel to report one step.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    step_timeout: std::time::Duration,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(command: CaCommand) -> anyhow::Result<i32> {
    match command {
        CaCommand::Rotate(args) => {
            let lab = Lab::attach(args.lab.name.as_deref())?;
            let rotation = lab.rotate_root(args.step_timeout)?;
            match args.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rotation)?),
                Output::Table => {
                    let short =
                        |fingerprint: &str| fingerprint.chars().take(16).collect::<String>();
                    println!(
                        "rotated the mesh root: {} -> {}\n",
                        rotation
                            .old_roots
                            .iter()
                            .map(|root| short(root))
                            .collect::<Vec<_>>()
                            .join(", "),
                        short(&rotation.new_root)
                    );
                    let mut rows = vec![vec![
                        "STEP".to_string(),
                        "TOOK".into(),
                        "CERTIFICATES REPLACED".into(),
                    ]];
                    for step in &rotation.steps {
                        rows.push(vec![
                            step.step.to_string(),
                            format!("{:.1}s", step.elapsed_ms as f64 / 1000.0),
                            if step.step == "sign" {
                                step.certificates.to_string()
                            } else {
                                "-".into()
                            },
                        ]);
                    }
                    print!("{}", table(&rows));
                }
            }
            Ok(0)
        }
    }
}
