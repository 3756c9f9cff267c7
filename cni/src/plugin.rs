//! The plugin's commands.
//!
//! | command | enrolled pod | any other pod |
//! | --- | --- | --- |
//! | ADD | record it, hand it to the ztunnel, wait for the ack; fail if not captured | record it (best effort) |
//! | DEL | release its capture for this sandbox (never another's; an absent ztunnel is fine), forget the record | forget the record |
//! | CHECK | ask the ztunnel whether it is captured | nothing |
//! | GC | release and forget pods of attachments the runtime no longer has | same |
//!
//! ADD and CHECK print the previous plugin's result unchanged.

use kanava_handoff::records::{PodRecord, RecordDir, netns_inode};
use kanava_handoff::{Error as HandoffError, client};
use serde_json::Value;

use crate::enrollment::{LookupError, PodFacts, Source};
use crate::invocation::{Command, Invocation, NetConf, PodRef, result_ips};
use crate::{Error, SUPPORTED_VERSIONS};

/// Runs one call; returns what to print on success.
pub fn run(invocation: &Invocation, stdin: &[u8]) -> Result<Option<Value>, Error> {
    if invocation.command == Command::Version {
        // Answers whatever the configuration says: VERSION is how a runtime
        // finds out what to send.
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| "1.0.0".into());
        return Ok(Some(serde_json::json!({
            "cniVersion": asked,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    let records = RecordDir::new(&conf.pod_records_dir);
    match invocation.command {
        Command::Add => add(invocation, &conf, &records),
        Command::Del => delete(invocation, &conf, &records).map(|()| None),
        Command::Check => check(invocation, &conf).map(|()| None),
        Command::Gc => collect_garbage(&conf, &records).map(|()| None),
        Command::Status | Command::Version => Ok(None),
    }
}

fn add(
    invocation: &Invocation,
    conf: &NetConf,
    records: &RecordDir,
) -> Result<Option<Value>, Error> {
    let prev_result = conf.require_prev_result()?.clone();
    // Not a Kubernetes pod (say, `nerdctl run`), or one of the mesh's own
    // pods: nothing of ours.
    let Some(pod) = invocation.pod().filter(|pod| !is_mesh_pod(conf, pod)) else {
        return Ok(Some(prev_result));
    };
    let Some(facts) = lookup(conf, &pod)? else {
        return Ok(Some(prev_result));
    };
    let uid = pod.uid.clone().unwrap_or_else(|| facts.uid.clone());
    let netns_path = invocation.netns.clone().unwrap_or_default();
    let opened = std::fs::File::open(&netns_path).map_err(|e| Error::Io {
        context: format!("open the pod's network namespace {}", netns_path.display()),
        reason: e.to_string(),
    });
    let record = opened.as_ref().ok().and_then(|netns| {
        Some(PodRecord {
            uid: uid.clone(),
            container_id: invocation.container_id.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: facts.service_account.clone(),
            ips: result_ips(&prev_result),
            netns: netns_path.clone(),
            netns_inode: netns_inode(netns).ok()?,
        })
    });

    if !facts.enrolled {
        // Remembered so that the ztunnel can capture the pod if its
        // namespace joins the mesh later; never a reason to fail.
        if let Some(record) = &record
            && let Err(error) = records.write(record)
        {
            eprintln!("kanava-cni: pod {pod} outside the mesh not recorded: {error}");
        }
        return Ok(Some(prev_result));
    }

    let netns = opened?;
    let not_captured = |source: HandoffError| Error::NotCaptured {
        pod: pod.to_string(),
        source,
    };
    let record = record.ok_or_else(|| Error::Io {
        context: format!("record pod {pod}"),
        reason: "cannot read its network namespace's inode".into(),
    })?;
    if record.ips.is_empty() {
        return Err(Error::Config(format!(
            "the previous plugin's result gives pod {pod} no IP address; is kanava-cni chained after the primary plugin?"
        )));
    }
    // Written first: a ztunnel restarting right after the ack finds it.
    records.write(&record).map_err(not_captured)?;
    allow_pending_connections_to_move(&netns, &pod);
    let info = pod_info(&record);
    if let Err(error) = client::add_pod(&conf.socket_path, info, &netns, conf.timeout()) {
        let _ = records.remove(&uid);
        return Err(not_captured(error));
    }
    Ok(Some(prev_result))
}

/// Sets `net.ipv4.tcp_migrate_req` in the pod's network namespace, so that
/// connections waiting to be accepted move to a successor ztunnel's
/// listeners at a hand-over instead of being reset. Done here because the
/// plugin runs on the host, where `/proc/sys` is writable; in the ztunnel's
/// container it is read-only. A kernel without the setting (before Linux
/// 5.14) costs only that, so a failure is said and the pod goes on.
fn allow_pending_connections_to_move(netns: &std::fs::File, pod: &PodRef) {
    let set = netns
        .try_clone()
        .map_err(|e| e.to_string())
        .and_then(|file| {
            kanava_netns::NetNs::from_fd(file.into(), format!("pod {pod}"))
                .map_err(|e| e.to_string())
        })
        .and_then(|netns| {
            netns
                .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", b"1"))
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        });
    if let Err(error) = set {
        eprintln!("kanava-cni: net.ipv4.tcp_migrate_req not set for pod {pod}: {error}");
    }
}

fn pod_info(record: &PodRecord) -> kanava_handoff::PodInfo {
    kanava_handoff::PodInfo {
        uid: record.uid.clone(),
        name: record.name.clone(),
        namespace: record.namespace.clone(),
        service_account: record.service_account.clone(),
        ips: record.ips.clone(),
        container_id: record.container_id.clone(),
    }
}

/// Releases the pod of the sandbox this DEL names, and nothing else.
///
/// Runtimes send DEL more than once, after the pod is gone, and for
/// sandboxes whose ADD failed, sometimes long after the pod's next sandbox
/// was captured (the same pod uid). A DEL for a sandbox other than the one
/// recorded is such a leftover: the live sandbox stays captured. The
/// ztunnel checks the sandbox again (it may hold the pod without a record).
///
/// DEL never fails because of the ztunnel: a pod must always be deletable,
/// and a ztunnel that missed the release drops the pod when discovery says
/// it is gone.
fn delete(invocation: &Invocation, conf: &NetConf, records: &RecordDir) -> Result<(), Error> {
    let sandbox = invocation.container_id.as_str();
    let uid = match invocation.pod().and_then(|p| p.uid) {
        Some(uid) => uid,
        None => match find_by_container(records, sandbox) {
            Some(uid) => uid,
            None => return Ok(()), // never set up by us, or already gone
        },
    };
    let recorded = records.read(&uid).ok().flatten();
    if let Some(record) = &recorded
        && !record.container_id.is_empty()
        && !sandbox.is_empty()
        && record.container_id != sandbox
    {
        eprintln!(
            "kanava-cni: DEL for sandbox {sandbox} of pod uid {uid} ignored: the pod runs in sandbox {}",
            record.container_id
        );
        return Ok(());
    }
    if let Err(error) = release(conf, records, &uid, Some(sandbox).filter(|s| !s.is_empty())) {
        eprintln!("kanava-cni: DEL of pod uid {uid}: {error}");
    }
    Ok(())
}

/// Releases a pod from the ztunnel and forgets its record. A ztunnel that
/// is not running has nothing to release: the pod's namespace goes with it.
///
/// The record goes first: the ztunnel captures recorded pods that discovery
/// still shows in the mesh (a pod being deleted is, for a moment), and
/// would otherwise take the pod back between the two steps.
fn release(
    conf: &NetConf,
    records: &RecordDir,
    uid: &str,
    sandbox: Option<&str>,
) -> Result<(), Error> {
    records.remove(uid).map_err(|e| Error::Io {
        context: format!("forget pod uid {uid}"),
        reason: e.to_string(),
    })?;
    match client::delete_pod(&conf.socket_path, uid, sandbox, conf.timeout()) {
        Ok(()) | Err(HandoffError::Unreachable { .. }) => Ok(()),
        Err(error) => Err(Error::NotReleased {
            pod: format!("uid {uid}"),
            source: error,
        }),
    }
}

fn find_by_container(records: &RecordDir, container_id: &str) -> Option<String> {
    records.uids().ok()?.into_iter().find(|uid| {
        records
            .read(uid)
            .ok()
            .flatten()
            .is_some_and(|r| r.container_id == container_id)
    })
}

fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), Error> {
    conf.require_prev_result()?;
    let Some(pod) = invocation.pod().filter(|pod| !is_mesh_pod(conf, pod)) else {
        return Ok(());
    };
    let Some(facts) = lookup(conf, &pod)? else {
        return Ok(());
    };
    if !facts.enrolled {
        return Ok(());
    }
    let uid = pod.uid.clone().unwrap_or(facts.uid);
    client::check_pod(&conf.socket_path, &uid, conf.timeout()).map_err(|source| {
        Error::NotCaptured {
            pod: pod.to_string(),
            source,
        }
    })
}

fn collect_garbage(conf: &NetConf, records: &RecordDir) -> Result<(), Error> {
    let Some(valid) = &conf.valid_attachments else {
        return Ok(());
    };
    let uids = records.uids().map_err(|e| Error::Io {
        context: "list pod records".into(),
        reason: e.to_string(),
    })?;
    for uid in uids {
        let Ok(Some(record)) = records.read(&uid) else {
            continue;
        };
        if !valid.iter().any(|a| a.container_id == record.container_id) {
            let sandbox = Some(record.container_id.as_str()).filter(|s| !s.is_empty());
            release(conf, records, &uid, sandbox)?;
        }
    }
    Ok(())
}

/// The mesh's own pods (control plane, ztunnel, installer) start whatever
/// state the node's configuration or its credentials are in: they are what
/// repairs it.
fn is_mesh_pod(conf: &NetConf, pod: &PodRef) -> bool {
    pod.namespace == conf.mesh_namespace
}

/// Reads whether the pod is in the mesh. `None`: the mesh is gone from this
/// node (the API server refuses the plugin's credentials and no ztunnel
/// answers, as after an uninstall that could not clean the node up): the pod
/// starts outside the mesh rather than never.
fn lookup(conf: &NetConf, pod: &PodRef) -> Result<Option<PodFacts>, Error> {
    match Source::from_conf(conf).lookup(pod) {
        Ok(facts) => Ok(Some(facts)),
        Err(LookupError::Unauthorized(reason)) if !client::is_listening(&conf.socket_path) => {
            eprintln!(
                "kanava-cni: pod {pod} starts outside the mesh: the API server refuses this node's \
                 kanava-cni credentials ({reason}) and no ztunnel listens on {}; kanava-cni is left \
                 over from an uninstall: remove it from the node's CNI configuration",
                conf.socket_path.display()
            );
            Ok(None)
        }
        Err(error) => Err(Error::Enrollment {
            pod: pod.to_string(),
            reason: error.to_string(),
        }),
    }
}
