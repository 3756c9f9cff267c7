//! The `kanava` binary as an operator meets it: help that lists every
//! command, and clear errors for bad input. Nothing here needs root: every
//! case fails before a lab would be built, in a lab root of its own.

use std::path::PathBuf;
use std::process::{Command, Output};

/// A directory of this test's own, used as the lab root and for files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kanava-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn kanava(root: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kanava"))
        .args(args)
        .env("KANAVA_LAB_ROOT", root)
        .output()
        .expect("run kanava")
}

/// `kanava lab up` of a file holding `text`, as lab `name`.
fn up(root: &PathBuf, file: &str, text: Option<&str>, name: &str) -> Output {
    let path = root.join(file);
    if let Some(text) = text {
        std::fs::write(&path, text).expect("write the lab file");
    }
    kanava(
        root,
        &[
            "lab",
            "up",
            "-f",
            path.to_str().expect("path"),
            "--name",
            name,
        ],
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_lists_every_lab_command() {
    let root = scratch("help");
    let output = kanava(&root, &["lab", "--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in [
        "up", "apply", "delete", "status", "exec", "ip", "logs", "down", "clean",
    ] {
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(&format!("{command} "))),
            "`kanava lab --help` does not list {command}:\n{help}"
        );
    }
}

#[test]
fn a_lab_that_does_not_run_is_named_in_the_error() {
    let root = scratch("missing-lab");
    for args in [
        &["lab", "status", "--name", "nowhere"][..],
        &["lab", "logs", "--name", "nowhere", "control-plane"][..],
        &["lab", "down", "--name", "nowhere"][..],
    ] {
        let output = kanava(&root, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let error = stderr(&output);
        assert!(
            error.contains("no lab named \"nowhere\""),
            "{args:?}: {error}"
        );
    }
}

#[test]
fn a_bad_lab_file_is_refused_with_its_problem_before_anything_is_built() {
    let root = scratch("bad-file");
    let output = up(&root, "missing.yaml", None, "t");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("missing.yaml"),
        "{}",
        stderr(&output)
    );

    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
    let output = up(&root, "deployment.yaml", Some(deployment), "t");
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert!(
        error.contains("kind Deployment is not supported"),
        "{error}"
    );
    assert!(
        std::fs::read_dir(&root)
            .expect("root")
            .all(|e| e.is_ok_and(|e| e.path().is_file())),
        "no lab directory was created"
    );
}

#[test]
fn an_invalid_lab_name_is_refused() {
    let root = scratch("bad-name");
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
    let output = up(&root, "namespace.yaml", Some(namespace), "Not_Valid");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("not a valid name"),
        "{}",
        stderr(&output)
    );
}
