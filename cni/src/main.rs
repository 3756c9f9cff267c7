//! The `kanava-cni` binary: one CNI call per process.

use std::io::{Read, Write};

use kanava_cni::invocation::Invocation;
use kanava_cni::plugin;

/// Configurations are a few KiB; a runtime never sends more than this.
const MAX_STDIN_BYTES: u64 = 1024 * 1024;

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_STDIN_BYTES)
        .read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    let outcome = match read {
        Err(error) => Err(kanava_cni::Error::Io {
            context: "read standard input".into(),
            reason: error.to_string(),
        }),
        Ok(_) => Invocation::from_env(|name| std::env::var(name).ok())
            .and_then(|invocation| plugin::run(&invocation, &stdin)),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(output) => {
            if let Some(output) = output {
                let _ = writeln!(stdout, "{output}");
            }
        }
        Err(error) => {
            let _ = writeln!(stdout, "{}", error.to_json(&version));
            eprintln!("kanava-cni: {error}");
            std::process::exit(1);
        }
    }
}
