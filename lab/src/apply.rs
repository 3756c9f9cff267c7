//! Applying and deleting objects in a lab, as `kubectl apply` / `delete`
//! would against a cluster — and doing what the cluster's components would
//! do about them: schedule pods, build their networks through the CNI chain
//! (which hands enrolled pods to their ztunnel), start and stop their
//! processes, allocate Service IPs.
//!
//! Everything is checked first ([`plan`](crate::plan)); nothing changes unless the whole
//! file is acceptable.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kanava_cluster::Object;
use kanava_mesh::is_enrolled;

use crate::context::{Context, Progress};
use crate::layout::Layout;
use crate::manifests::{self, Manifests};
use crate::plan::{Current, Plan, REDIRECTION_ANNOTATION, plan};
use crate::propagation::Expect;
use crate::spec::parse_objects;
use crate::state::{self, LabState};
use crate::{Error, pods, propagation};

/// Applies manifests to the lab `name` (see [`Lab::apply`](crate::Lab::apply)).
pub fn apply_manifests(
    name: &str,
    yaml: &str,
    progress: Option<Progress>,
) -> Result<Report, Error> {
    with_lab(name, yaml, progress, |state, objects, layout, env| {
        let current = Current {
            nodes: state.nodes.iter().map(|n| n.name.clone()).collect(),
            families: state.families.clone(),
            objects: Manifests::new(layout.manifest_dir()).read()?,
        };
        let plan = plan(objects, &current)?;
        execute(state, plan, env)
    })
}

/// Deletes the objects named in manifests from the lab `name` (see
/// [`Lab::delete`](crate::Lab::delete)).
pub fn delete_manifests(
    name: &str,
    yaml: &str,
    progress: Option<Progress>,
) -> Result<Report, Error> {
    with_lab(name, yaml, progress, |state, objects, _, env| {
        delete(state, objects, env)
    })
}

/// Reads `yaml`, locks the lab `name` and runs `change` on its state.
fn with_lab(
    name: &str,
    yaml: &str,
    progress: Option<Progress>,
    change: impl FnOnce(&mut LabState, &[Object], &Layout, &Context) -> Result<Report, Error>,
) -> Result<Report, Error> {
    let (objects, _) = parse_objects(yaml, false)?;
    let layout = Layout::new(name);
    let _lock = state::lock(&layout)?;
    let mut state = LabState::load(name)?;
    let mut env = Context::discover(None)?;
    env.progress = progress;
    change(&mut state, &objects, &layout, &env)
}

/// What an apply or delete did.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per change, e.g. `pod shop/web created`.
    pub changes: Vec<String>,
    /// What did not work out but did not stop the rest, e.g. a policy the
    /// control plane did not serve (rejected as invalid).
    pub warnings: Vec<String>,
    /// The longest a change took from being stored to being held by every
    /// ztunnel.
    pub propagation: std::time::Duration,
}

/// Carries out `plan` in a running lab.
pub fn execute(state: &mut LabState, plan: Plan, env: &Context) -> Result<Report, Error> {
    let manifests = Manifests::new(state.layout().manifest_dir());
    let mut report = Report::default();
    let mut expect = Vec::new();

    for namespace in plan.namespaces {
        let name = namespace.metadata.name.clone().unwrap_or_default();
        let version = manifests.write(state, Object::Namespace(Arc::new(namespace)))?;
        // Its pods' workloads change with it (mode, enrollment).
        expect.extend(
            state
                .pods
                .iter()
                .filter(|p| p.namespace == name)
                .map(|p| Expect::workload(&p.uid, version)),
        );
        report.changes.push(format!("namespace {name} configured"));
    }
    for pod in &plan.new_pods {
        env.check_cancel()?;
        // Stored first, as in a cluster: the CNI plugin reads it.
        manifests.write(state, Object::Pod(Arc::new(pod.clone())))?;
        let created = pods::create_network(state, env, pod)?;
        let key = created.key();
        state.pods.push(created);
        state.save()?;
        let version = manifests.write(
            state,
            Object::Pod(Arc::new(pods::manifest(state, pod, false)?)),
        )?;
        expect.push(Expect::workload(&pod_uid(pod), version));
        report.changes.push(format!("pod {key} created"));
    }
    for pod in plan.changed_pods {
        let uid = pod_uid(&pod);
        let key = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        let version = manifests.write(state, Object::Pod(Arc::new(pod)))?;
        expect.push(Expect::workload(&uid, version));
        report.changes.push(format!("pod {key} configured"));
    }
    for service in plan.services {
        let key = format!(
            "{}/{}",
            service.metadata.namespace.as_deref().unwrap_or(""),
            service.metadata.name.as_deref().unwrap_or("")
        );
        let ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .unwrap_or_default();
        let version = manifests.write(state, Object::Service(Arc::new(service)))?;
        expect.push(Expect::service(&key, version));
        report
            .changes
            .push(format!("service {key} configured (clusterIP {ip})"));
    }
    for policy in plan.policies {
        let key = format!(
            "{}/{}",
            policy.metadata.namespace.as_deref().unwrap_or(""),
            policy.metadata.name.as_deref().unwrap_or("")
        );
        let version = manifests.write(state, Object::AuthorizationPolicy(Arc::new(policy)))?;
        expect.push(Expect::policy(&key, version));
        report
            .changes
            .push(format!("authorizationpolicy {key} configured"));
    }
    state.save()?;

    expect.extend(reconcile_capture(state, &manifests, env, &mut report)?);
    wait(state, env, expect, &mut report)?;

    // Pods start only now: captured, and known to every ztunnel.
    let mut expect = Vec::new();
    for pod in &plan.new_pods {
        env.check_cancel()?;
        let uid = pod_uid(pod);
        if let Some(version) = pods::start(state, &manifests, env, &uid)? {
            expect.push(Expect::workload(&uid, version));
        }
        state.save()?;
    }
    let started_pods = !expect.is_empty();
    wait(state, env, expect, &mut report)?;
    if started_pods {
        // A request made now finds its certificate ready, and `kanava
        // status` reports none missing.
        let missing = propagation::wait_for_certificates(
            state,
            env.propagation_timeout,
            env.cancel.as_ref(),
        )?;
        for (node, identity) in missing {
            report.warnings.push(format!(
                "the ztunnel on {node} has no certificate for {identity} yet (see `kanava lab logs --name {} ztunnel/{node}`)",
                state.name
            ));
        }
    }
    Ok(report)
}

/// Deletes the objects named in a file (cascading from namespaces to what
/// they hold).
pub fn delete(state: &mut LabState, objects: &[Object], env: &Context) -> Result<Report, Error> {
    let manifests = Manifests::new(state.layout().manifest_dir());
    let current = manifests.read()?;
    let mut targets: Vec<Object> = Vec::new();
    for object in objects {
        let key = manifests::key(object);
        let split = |key: &str| {
            let (ns, name) = key.split_once('/').unwrap_or(("default", key));
            (ns.to_string(), name.to_string())
        };
        let found = match object {
            Object::Namespace(_) => {
                let Some(ns) = current.namespaces.get(&key) else {
                    return Err(Error::Spec(format!("namespace {key} not found")));
                };
                let in_namespace = |k: &(String, String)| k.0 == key;
                targets.extend(
                    current
                        .pods
                        .iter()
                        .filter(|(k, _)| in_namespace(k))
                        .map(|(_, p)| Object::Pod(p.clone())),
                );
                targets.extend(
                    current
                        .services
                        .iter()
                        .filter(|(k, _)| in_namespace(k))
                        .map(|(_, s)| Object::Service(s.clone())),
                );
                targets.extend(
                    current
                        .policies
                        .iter()
                        .filter(|(k, _)| in_namespace(k))
                        .map(|(_, p)| Object::AuthorizationPolicy(p.clone())),
                );
                Object::Namespace(ns.clone())
            }
            Object::Pod(_) => current
                .pods
                .get(&split(&key))
                .map(|p| Object::Pod(p.clone()))
                .ok_or_else(|| Error::Spec(format!("pod {key} not found")))?,
            Object::Service(_) => current
                .services
                .get(&split(&key))
                .map(|s| Object::Service(s.clone()))
                .ok_or_else(|| Error::Spec(format!("service {key} not found")))?,
            Object::AuthorizationPolicy(_) => current
                .policies
                .get(&split(&key))
                .map(|p| Object::AuthorizationPolicy(p.clone()))
                .ok_or_else(|| Error::Spec(format!("authorizationpolicy {key} not found")))?,
        };
        targets.push(found);
    }

    let mut report = Report::default();
    let mut expect = Vec::new();
    for object in &targets {
        let key = manifests::key(object);
        match object {
            Object::Pod(pod) => {
                let uid = pod_uid(pod);
                pods::destroy(state, env, &uid)?;
                manifests.remove(object)?;
                state.pods.retain(|p| p.uid != uid);
                state.save()?;
                expect.push(Expect::gone(&format!("workload/{uid}")));
            }
            Object::Service(_) => {
                manifests.remove(object)?;
                expect.push(Expect::gone(&format!("service/{key}")));
            }
            Object::AuthorizationPolicy(_) => {
                manifests.remove(object)?;
                expect.push(Expect::gone(&format!("policy/{key}")));
            }
            Object::Namespace(_) => manifests.remove(object)?,
        }
        report.changes.push(format!(
            "{} {key} deleted",
            object.kind().as_str().to_lowercase()
        ));
    }
    wait(state, env, expect, &mut report)?;
    Ok(report)
}

/// Notes every running pod whose enrollment changed (its namespace's label,
/// its own opt-out) and waits for its ztunnel to capture or release it.
/// Returns what the ztunnels must see before the change is complete.
fn reconcile_capture(
    state: &mut LabState,
    manifests: &Manifests,
    env: &Context,
    report: &mut Report,
) -> Result<Vec<Expect>, Error> {
    let objects = manifests.read()?;
    let mut expect = Vec::new();
    let mut pending = Vec::new();
    let keys: Vec<(String, String)> = state
        .pods
        .iter()
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    for key in keys {
        env.check_cancel()?;
        let Some(pod) = objects.pods.get(&key) else {
            continue;
        };
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let wanted = !host_network
            && is_enrolled(
                objects
                    .namespaces
                    .get(&key.0)
                    .and_then(|ns| ns.metadata.labels.as_ref()),
                pod.metadata.labels.as_ref(),
            );
        let Some(index) = state
            .pods
            .iter()
            .position(|p| p.namespace == key.0 && p.name == key.1)
        else {
            continue;
        };
        if wanted == state.pods[index].captured {
            continue;
        }
        // The ztunnel follows the change itself (from discovery); the
        // lab only waits for it to have done so.
        report.changes.push(format!(
            "pod {}/{} {}",
            key.0,
            key.1,
            if wanted { "captured" } else { "released" }
        ));
        pending.push((index, wanted));
        state.pods[index].captured = wanted;
        state.save()?;
        let mut pod = (**pod).clone();
        let annotations = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        if wanted {
            annotations.insert(REDIRECTION_ANNOTATION.into(), "enabled".into());
        } else {
            annotations.remove(REDIRECTION_ANNOTATION);
        }
        let uid = pod_uid(&pod);
        let version = manifests.write(state, Object::Pod(Arc::new(pod)))?;
        expect.push(Expect::workload(&uid, version));
    }
    state.save()?;
    for (index, wanted) in pending {
        pods::wait_captured(state, index, env, wanted)?;
    }
    Ok(expect)
}

fn wait(
    state: &LabState,
    env: &Context,
    expect: Vec<Expect>,
    report: &mut Report,
) -> Result<(), Error> {
    if expect.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let missing = propagation::wait(state, &expect, env.propagation_timeout, env.cancel.as_ref())?;
    report.propagation = report.propagation.max(started.elapsed());
    for (node, name) in missing {
        report.warnings.push(if name.starts_with("policy/") {
            format!("{name} has not reached the ztunnel on {node}: the control plane rejected it? (see `kanava lab logs control-plane`)")
        } else {
            format!("{name} has not reached the ztunnel on {node} yet")
        });
    }
    Ok(())
}

fn pod_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}
