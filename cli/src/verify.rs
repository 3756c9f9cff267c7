//! `kanava verify`: runs the isolation checks against a lab and prints what
//! each expected and observed.

use clap::Args;
use kanava_lab::Lab;
use kanava_lab::verify::{Check, all_passed};

use crate::lab::{LabName, Output, table};

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    lab: LabName,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(args: &VerifyArgs) -> anyhow::Result<i32> {
    let mut lab = Lab::attach(args.lab.name.as_deref())?;
    let checks = kanava_lab::verify::run(&mut lab);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Output::Table => print!("{}", report(&checks)),
    }
    Ok(if all_passed(&checks) { 0 } else { 1 })
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
            match check.family {
                Some(family) => format!("{} ({family})", check.name),
                None => check.name.clone(),
            },
            check.expected.clone(),
            check.observed.clone(),
            match check.passed {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "skipped",
            }
            .into(),
        ]);
    }
    let failed = checks.iter().filter(|c| c.passed == Some(false)).count();
    format!(
        "{}\n{} checks: {} passed, {failed} failed, {} skipped\n",
        table(&rows),
        checks.len(),
        checks.iter().filter(|c| c.passed == Some(true)).count(),
        checks.iter().filter(|c| c.passed.is_none()).count()
    )
}
