//! The plugin's commands.
//!
//! | command | enrolled pod | any other pod |
//! | --- | --- | --- |
//! | ADD | record it, hand it to the ztunnel, wait for the ack; fail if not captured | record it (best effort) |
//! | DEL | release it (an absent ztunnel is fine), forget the record | forget the record |
//! | CHECK | ask the ztunnel whether it is captured | nothing |
//! | GC | release and forget pods of attachments the runtime no longer has | same |
//!
//! ADD and CHECK print the previous plugin's result unchanged.

use kanava_handoff::records::{PodRecord, RecordDir, netns_inode};
use kanava_handoff::{Error as HandoffError, client};
use serde_json::Value;

use crate::enrollment::{PodFacts, Source};
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
    // Not a Kubernetes pod (say, `nerdctl run`): nothing of ours.
    let Some(pod) = invocation.pod() else {
        return Ok(Some(prev_result));
    };
    let facts = lookup(conf, &pod)?;
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
    let info = pod_info(&record);
    if let Err(error) = client::add_pod(&conf.socket_path, info, &netns, conf.timeout()) {
        let _ = records.remove(&uid);
        return Err(not_captured(error));
    }
    Ok(Some(prev_result))
}

fn pod_info(record: &PodRecord) -> kanava_handoff::PodInfo {
    kanava_handoff::PodInfo {
        uid: record.uid.clone(),
        name: record.name.clone(),
        namespace: record.namespace.clone(),
        service_account: record.service_account.clone(),
        ips: record.ips.clone(),
    }
}

fn delete(invocation: &Invocation, conf: &NetConf, records: &RecordDir) -> Result<(), Error> {
    let uid = match invocation.pod().and_then(|p| p.uid) {
        Some(uid) => Some(uid),
        None => find_by_container(records, &invocation.container_id),
    };
    let Some(uid) = uid else {
        return Ok(()); // never set up by us, or already gone
    };
    release(conf, records, &uid)
}

/// Releases a pod from the ztunnel and forgets its record. A ztunnel that
/// is not running has nothing to release: the pod's namespace goes with it.
///
/// The record goes first: the ztunnel captures recorded pods that discovery
/// still shows in the mesh (a pod being deleted is, for a moment), and
/// would otherwise take the pod back between the two steps.
fn release(conf: &NetConf, records: &RecordDir, uid: &str) -> Result<(), Error> {
    records.remove(uid).map_err(|e| Error::Io {
        context: format!("forget pod uid {uid}"),
        reason: e.to_string(),
    })?;
    match client::delete_pod(&conf.socket_path, uid, conf.timeout()) {
        Ok(()) | Err(HandoffError::Unreachable { .. }) => Ok(()),
        Err(error) => Err(Error::NotCaptured {
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
    let Some(pod) = invocation.pod() else {
        return Ok(());
    };
    let facts = lookup(conf, &pod)?;
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
            release(conf, records, &uid)?;
        }
    }
    Ok(())
}

fn lookup(conf: &NetConf, pod: &PodRef) -> Result<PodFacts, Error> {
    Source::from_conf(conf)
        .lookup(pod)
        .map_err(|reason| Error::Enrollment {
            pod: pod.to_string(),
            reason,
        })
}
