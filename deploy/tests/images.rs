//! The two ways of making the images say the same: `deploy/docker/Dockerfile`
//! (with a container engine) and `scripts/images.sh` (archives, without
//! one), which takes every setting from `deploy/docker/images.json`. Each
//! Dockerfile stage must have that file's binaries, entrypoint, user,
//! environment and ports, and the chart must name the same images.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(relative))
        .unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// What one stage of the Dockerfile says.
#[derive(Debug, Default, PartialEq)]
struct Stage {
    binaries: Vec<String>,
    entrypoint: Vec<String>,
    user: String,
    env: Vec<String>,
    ports: Vec<u64>,
}

fn stages(dockerfile: &str) -> BTreeMap<String, Stage> {
    let mut stages = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in dockerfile.lines().map(str::trim) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        if instruction == "FROM" {
            current = rest.split(" AS ").nth(1).map(str::to_string);
            if let Some(name) = &current {
                stages.insert(name.clone(), Stage::default());
            }
            continue;
        }
        let Some(stage) = current.as_ref().and_then(|name| stages.get_mut(name)) else {
            continue;
        };
        match instruction {
            "COPY" if rest.starts_with("--from=build") => {
                let paths: Vec<&str> = rest.split_whitespace().skip(1).collect();
                let (destination, sources) = paths.split_last().unwrap();
                assert!(destination.starts_with("/usr/local/bin/"), "{line}");
                stage.binaries.extend(
                    sources
                        .iter()
                        .map(|s| s.rsplit('/').next().unwrap().to_string()),
                );
            }
            "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(rest).unwrap(),
            "USER" => stage.user = rest.to_string(),
            "ENV" => stage.env.push(rest.to_string()),
            "EXPOSE" => stage
                .ports
                .extend(rest.split_whitespace().map(|p| p.parse::<u64>().unwrap())),
            _ => {}
        }
    }
    stages
}

#[test]
fn the_dockerfile_and_the_archives_make_the_same_images() {
    let dockerfile = stages(&read("docker/Dockerfile"));
    let images: BTreeMap<String, Value> =
        serde_json::from_str(&read("docker/images.json")).unwrap();
    assert_eq!(images.len(), 3, "three images");
    for (name, image) in &images {
        let stage_name = image["stage"].as_str().unwrap();
        let stage = dockerfile
            .get(stage_name)
            .unwrap_or_else(|| panic!("no Dockerfile stage {stage_name} for {name}"));
        let strings = |key: &str| -> Vec<String> {
            image[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let expected = Stage {
            binaries: strings("binaries"),
            entrypoint: strings("entrypoint"),
            user: image["user"].as_str().unwrap().to_string(),
            env: strings("env"),
            ports: image["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
                .collect(),
        };
        assert_eq!(
            stage, &expected,
            "{name}: the Dockerfile's stage {stage_name}"
        );
    }
    // The chart's images are these.
    let helpers = read("charts/kanava/templates/ztunnel.yaml")
        + &read("charts/kanava/templates/control-plane.yaml");
    for name in images.keys() {
        assert!(
            helpers.contains(&format!("\"{name}\"")),
            "the chart names {name}"
        );
    }
    // The script reads its settings from the file, not from copies.
    let script = read("../scripts/images.sh");
    assert!(script.contains("deploy/docker/images.json"));
    for name in images.keys() {
        assert!(
            script.contains(&format!("archive {name} ")),
            "images.sh makes {name}"
        );
    }
}
