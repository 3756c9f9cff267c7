//! The Helm chart: it lints, renders with default and non-default values,
//! every rendered object is valid for current Kubernetes, bad values fail
//! with the key's name, and the rendered objects hold what the design
//! promises (least privilege, security contexts, token audience, CNI paths).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../control-plane/tests/support/rbac.rs"]
mod rbac;

use std::path::{Path, PathBuf};

use kanava_deploy::{chart_dir, find, helm, kubernetes_validate, objects, render, run, run_ok};
use serde_json::{Value, json};

fn non_default_values() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/non-default-values.yaml")
}

fn rendered_default() -> Vec<Value> {
    objects(&render(&[]))
}

fn rendered_non_default() -> Vec<Value> {
    objects(&render(&["-f", non_default_values().to_str().unwrap()]))
}

/// Kubernetes versions the rendered objects must be valid for: the newest
/// the validator knows and the one the code's API types follow.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.37.0", "1.33.0"];

#[test]
fn the_chart_lints_strictly_with_default_and_non_default_values() {
    run_ok(helm().args(["lint", "--strict"]).arg(chart_dir()));
    run_ok(
        helm()
            .args(["lint", "--strict"])
            .arg(chart_dir())
            .arg("-f")
            .arg(non_default_values()),
    );
}

#[test]
fn every_rendered_object_and_the_crd_are_valid_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("default.yaml");
    let non_default = dir.path().join("non-default.yaml");
    std::fs::write(&default, render(&["--include-crds"])).unwrap();
    std::fs::write(
        &non_default,
        render(&[
            "--include-crds",
            "-f",
            non_default_values().to_str().unwrap(),
        ]),
    )
    .unwrap();
    for version in KUBERNETES_VERSIONS {
        let output = run_ok(
            kubernetes_validate()
                .args(["--strict", "--kubernetes-version", version])
                .arg(&default)
                .arg(&non_default),
        );
        // One line per object and file; none failed (the exit status says
        // so too), and every kind was looked at.
        for kind in [
            "customresourcedefinition",
            "deployment",
            "daemonset",
            "service",
            "clusterrole",
            "role",
            "poddisruptionbudget",
        ] {
            assert!(
                output.contains(&format!("passed for resource {kind}/")),
                "{kind} not validated against {version}:\n{output}"
            );
        }
    }
}

#[test]
fn helm_install_dry_run_works_without_a_cluster_and_notes_say_how_to_enroll() {
    let output = run_ok(helm().args(["install", "mesh"]).arg(chart_dir()).args([
        "-n",
        "kanava-system",
        "--create-namespace",
        "--dry-run=client",
    ]));
    assert!(output.contains("STATUS: pending-install"), "{output}");
    assert!(
        output.contains("kubectl label namespace <namespace> kanava.io/dataplane-mode=ambient"),
        "NOTES say how to enroll:\n{output}"
    );
    assert!(output.contains("kanava_pods_captured"), "and how to check");
}

#[test]
fn bad_values_fail_with_the_name_of_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (values, mentions) in [
        ("trustDomain: 5\n", "/trustDomain"),
        ("certificateTTL: one day\n", "/certificateTTL"),
        ("logFormat: xml\n", "/logFormat"),
        ("controlPlane: {replicas: 0}\n", "/controlPlane/replicas"),
        (
            "cni: {binDir: opt/cni/bin, confDir: /etc/cni/net.d}\n",
            "/cni/binDir",
        ),
        (
            "image: {registry: r, pullPolicy: Sometimes}\n",
            "/image/pullPolicy",
        ),
        ("contrlPlane: {replicas: 2}\n", "contrlPlane"),
        (
            "pluginCA: {secretName: Not_A_Name}\n",
            "/pluginCA/secretName",
        ),
    ] {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, values).unwrap();
        let output = run(helm()
            .args(["template", "mesh"])
            .arg(chart_dir())
            .arg("-f")
            .arg(&file));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{values:?} was accepted");
        assert!(stderr.contains(mentions), "{values:?}: {stderr}");
    }
}

/// The roles bound to a service account.
fn roles_of(objects: &[Value], account: &str) -> Vec<Value> {
    let bound: Vec<(&str, &str)> = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
        .filter(|b| {
            b["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account)
        })
        .map(|b| {
            (
                b["roleRef"]["kind"].as_str().unwrap(),
                b["roleRef"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    objects
        .iter()
        .filter(|o| {
            bound.contains(&(
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or(""),
            ))
        })
        .cloned()
        .collect()
}

#[test]
fn rbac_has_no_wildcards_and_grants_exactly_what_each_component_asks() {
    for objects in [rendered_default(), rendered_non_default()] {
        for role in objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        {
            for rule in role["rules"].as_array().unwrap() {
                for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    let values = rule[field].as_array().cloned().unwrap_or_default();
                    assert!(
                        !values
                            .iter()
                            .any(|v| v.as_str().unwrap_or("").contains('*')),
                        "wildcard in {} {}: {rule}",
                        role["kind"],
                        role["metadata"]["name"]
                    );
                }
            }
        }
    }

    // The control plane: the chart's rules are those every API call of the
    // control plane is checked against (control-plane/tests).
    let objects = rendered_default();
    let reference =
        rbac::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac/control-plane.yaml"));
    for kind in ["ClusterRole", "Role"] {
        assert_eq!(
            find(&objects, kind, "kanava-control-plane")["rules"],
            find(&reference, kind, "kanava-control-plane")["rules"],
            "the chart's {kind} differs from deploy/rbac/control-plane.yaml"
        );
    }

    // The CNI plugin and its installer, with the ztunnel's account.
    let cni = roles_of(&objects, "ztunnel");
    for request in [
        "GET /api/v1/namespaces/shop?",
        "GET /api/v1/namespaces/shop/pods/web?",
        "GET /apis/apps/v1/namespaces/kanava-system/daemonsets/ztunnel?",
    ] {
        assert!(
            rbac::allows(&cni, &rbac::attributes_of(request)),
            "{request} refused"
        );
    }
    for request in [
        "GET /api/v1/pods?",
        "GET /api/v1/namespaces/shop/secrets/db?",
        "PATCH /api/v1/namespaces/shop/pods/web?",
        "GET /apis/apps/v1/namespaces/kanava-system/daemonsets/other?",
    ] {
        assert!(
            !rbac::allows(&cni, &rbac::attributes_of(request)),
            "{request} allowed"
        );
    }
    // The plug-in CA's Secret name follows the value.
    let role = find(&rendered_non_default(), "Role", "kanava-control-plane").clone();
    assert!(rbac::allows(
        &[role],
        &rbac::attributes_of("GET /api/v1/namespaces/kanava-system/secrets/corporate-ca?")
    ));
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    &container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {}", container["name"]))["value"]
}

#[test]
fn security_contexts_give_each_container_only_what_it_needs() {
    for objects in [rendered_default(), rendered_non_default()] {
        let control_plane = container(
            find(&objects, "Deployment", "kanava-control-plane"),
            "control-plane",
        );
        let context = &control_plane["securityContext"];
        assert_eq!(context["runAsNonRoot"], true);
        assert_eq!(context["readOnlyRootFilesystem"], true);
        assert_eq!(context["allowPrivilegeEscalation"], false);
        assert_eq!(context["capabilities"], json!({"drop": ["ALL"]}));
        assert_eq!(context["seccompProfile"]["type"], "RuntimeDefault");
        assert!(control_plane["readinessProbe"]["httpGet"].is_object());
        assert_eq!(
            control_plane["livenessProbe"]["httpGet"]["path"], "/healthz",
            "liveness over plain HTTP: a TCP probe of the TLS port logs as a failed handshake"
        );
        assert!(control_plane["resources"]["requests"].is_object());

        let daemonset = find(&objects, "DaemonSet", "ztunnel");
        let pod = &daemonset["spec"]["template"]["spec"];
        assert_ne!(
            pod["hostNetwork"], true,
            "the ztunnel keeps its admin port out of the node's namespace"
        );
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "no API token for the ztunnel"
        );
        let ztunnel = container(daemonset, "ztunnel");
        let context = &ztunnel["securityContext"];
        assert_ne!(context["privileged"], true);
        assert_eq!(context["allowPrivilegeEscalation"], false);
        assert_eq!(context["readOnlyRootFilesystem"], true);
        assert_eq!(context["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            context["capabilities"]["add"],
            json!(["NET_ADMIN", "SYS_ADMIN", "NET_RAW"])
        );
        let installer = container(daemonset, "cni-install");
        let context = &installer["securityContext"];
        assert_ne!(context["privileged"], true);
        assert_eq!(
            context["capabilities"],
            json!({"drop": ["ALL"]}),
            "the installer adds no capability"
        );
        assert_eq!(context["readOnlyRootFilesystem"], true);

        // Rolling updates start the new ztunnel before stopping the old.
        let rolling = &daemonset["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(rolling["maxUnavailable"], 0);
        assert_eq!(rolling["maxSurge"], 1);
        // The old one hands over on the node's shared socket directory and
        // has time to drain what cannot move.
        let ztunnel = container(daemonset, "ztunnel");
        let env = |name: &str| {
            ztunnel["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].clone())
        };
        assert_eq!(
            env("KANAVA_UPGRADE_SOCKET"),
            Some(json!("/var/run/kanava/ztunnel-upgrade.sock"))
        );
        // 10 s by default, 45 s in the non-default values.
        let drain: u64 = env("KANAVA_TERMINATION_GRACE")
            .and_then(|v| v.as_str().and_then(|v| v.strip_suffix('s')?.parse().ok()))
            .expect("a drain time in seconds");
        assert!(drain == 10 || drain == 45, "{drain}");
        assert_eq!(
            daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            drain + 20,
            "longer than the drain"
        );
    }
}

#[test]
fn the_ztunnel_proves_itself_with_a_token_for_audience_kanava() {
    let objects = rendered_default();
    let daemonset = find(&objects, "DaemonSet", "ztunnel");
    let volumes = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "kanava-token")
        .unwrap();
    let source = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], "kanava");
    let ztunnel = container(daemonset, "ztunnel");
    let mount = ztunnel["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "kanava-token")
        .unwrap();
    assert_eq!(
        env(ztunnel, "KANAVA_NODE_TOKEN_FILE").as_str().unwrap(),
        format!(
            "{}/{}",
            mount["mountPath"].as_str().unwrap(),
            source["path"].as_str().unwrap()
        )
    );
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"],
        "ztunnel"
    );
    // The API token is the installer's alone.
    assert!(
        !ztunnel["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "api-token")
    );
}

#[test]
fn values_reach_the_objects() {
    let objects = rendered_non_default();
    let daemonset = find(&objects, "DaemonSet", "ztunnel");
    let volumes = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let host_path = |name: &str| {
        volumes.iter().find(|v| v["name"] == name).unwrap()["hostPath"]["path"].clone()
    };
    assert_eq!(host_path("cni-bin"), "/var/lib/rancher/k3s/data/cni");
    assert_eq!(
        host_path("cni-conf"),
        "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    );
    let installer = container(daemonset, "cni-install");
    assert_eq!(
        env(installer, "KANAVA_HOST_CNI_CONF_DIR"),
        "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        "the conflist names the kubeconfig by its host path"
    );
    assert_eq!(
        installer["image"],
        "registry.example.org:5000/mesh/kanava-cni-install:0.1.0-rc1"
    );
    assert_eq!(installer["imagePullPolicy"], "Always");
    let ztunnel = container(daemonset, "ztunnel");
    assert_eq!(env(ztunnel, "KANAVA_TRUST_DOMAIN"), "prod.example.org");
    assert_eq!(env(ztunnel, "KANAVA_LOG_FORMAT"), "json");
    assert_eq!(env(ztunnel, "RUST_LOG"), "debug,kube=info");
    assert_eq!(env(installer, "KANAVA_LOG_FORMAT"), "json");
    assert_eq!(env(installer, "RUST_LOG"), "debug,kube=info");
    assert_eq!(ztunnel["resources"]["limits"]["memory"], "2Gi");
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["tolerations"][0]["key"],
        "dedicated"
    );

    let deployment = find(&objects, "Deployment", "kanava-control-plane");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let control_plane = container(deployment, "control-plane");
    assert_eq!(env(control_plane, "KANAVA_CERT_TTL"), "12h");
    assert_eq!(
        env(control_plane, "KANAVA_PLUGIN_CA_SECRET"),
        "corporate-ca"
    );
    assert_eq!(
        env(control_plane, "KANAVA_TRUST_DOMAIN"),
        "prod.example.org"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["nodeSelector"],
        json!({"node-role.kubernetes.io/control-plane": ""})
    );
    let budget = find(&objects, "PodDisruptionBudget", "kanava-control-plane");
    assert_eq!(budget["spec"]["minAvailable"], 1);

    // Defaults: one replica, no budget; a ztunnel on every node; the
    // containerd paths.
    let objects = rendered_default();
    assert!(!objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
    let daemonset = find(&objects, "DaemonSet", "ztunnel");
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["tolerations"],
        json!([{"operator": "Exists"}])
    );
    let volumes = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let cni_bin = volumes.iter().find(|v| v["name"] == "cni-bin").unwrap();
    assert_eq!(cni_bin["hostPath"]["path"], "/opt/cni/bin");
    assert_eq!(
        container(daemonset, "ztunnel")["image"],
        "docker.io/kanava/kanava-ztunnel:0.1.0"
    );
    // The control plane's certificate name follows the release namespace.
    let objects = objects_in("other-ns");
    let ztunnel = container(find(&objects, "DaemonSet", "ztunnel"), "ztunnel");
    assert_eq!(
        env(ztunnel, "KANAVA_CONTROL_PLANE_ADDRESS"),
        "kanava-control-plane.other-ns.svc:15012"
    );
    let control_plane = container(
        find(&objects, "Deployment", "kanava-control-plane"),
        "control-plane",
    );
    assert_eq!(
        env(control_plane, "KANAVA_SERVER_NAMES"),
        "kanava-control-plane.other-ns.svc"
    );
}

fn objects_in(namespace: &str) -> Vec<Value> {
    objects(&run_ok(
        helm()
            .args(["template", "mesh"])
            .arg(chart_dir())
            .args(["--namespace", namespace]),
    ))
}

/// The lab runs the ztunnel as this chart's container runs
/// (`kanava_lab::container::ZTUNNEL`): if the chart changes what it grants,
/// the lab must change with it, or the lab tests would pass on what a node
/// refuses.
#[test]
fn the_lab_runs_the_ztunnel_as_the_chart_does() {
    let lab = kanava_lab::container::ZTUNNEL;
    for objects in [rendered_default(), rendered_non_default()] {
        let daemonset = find(&objects, "DaemonSet", "ztunnel");
        let pod = &daemonset["spec"]["template"]["spec"];
        let ztunnel = container(daemonset, "ztunnel");
        let context = &ztunnel["securityContext"];
        assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(context["capabilities"]["add"], json!(lab.capabilities));
        assert_eq!(
            context["allowPrivilegeEscalation"],
            lab.allow_privilege_escalation
        );
        assert_eq!(pod["hostPID"].as_bool().unwrap_or(false), lab.host_pid);
        let netns = ztunnel["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "netns")
            .expect("the netns mount");
        assert_eq!(netns["mountPropagation"], lab.netns_mount_propagation);
        // The installer's API token is laid out as a default service-account
        // volume, as the lab's test of the installer lays it out.
        let api_token = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "api-token")
            .expect("the api-token volume");
        let paths: Vec<&str> = api_token["projected"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|source| {
                let single = source["serviceAccountToken"]["path"].as_str();
                let items = source
                    .as_object()
                    .into_iter()
                    .flat_map(|o| o.values())
                    .flat_map(|v| v["items"].as_array().into_iter().flatten())
                    .filter_map(|item| item["path"].as_str());
                single.into_iter().chain(items)
            })
            .collect();
        assert_eq!(paths, ["token", "ca.crt", "namespace"]);
    }
}
