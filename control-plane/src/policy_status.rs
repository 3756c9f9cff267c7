//! What `kubectl get`/`describe` shows of an AuthorizationPolicy: an
//! `Accepted` condition in its status (written through the status
//! subresource), and an Event when it is rejected.
//!
//! After each translation, [`updates`] compares every policy's verdict with
//! the condition the object already carries, so only real changes are
//! written; the [`StatusWriter`] writes them on its own task, so the API
//! server's latency never holds up discovery. With several replicas each
//! writes the same condition; the write is idempotent.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kanava_cluster::crd::{AuthorizationPolicy, PolicyCondition};
use kanava_cluster::{ObjectKey, PolicyVerdict, SlimObjects};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

/// The condition's type.
pub const ACCEPTED: &str = "Accepted";
/// Wait before writing again after the API server refused a write.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A status a policy should carry and does not yet.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    pub key: ObjectKey,
    pub uid: Option<String>,
    pub condition: PolicyCondition,
}

/// The `Accepted` condition a verdict calls for.
pub fn condition_of(verdict: &PolicyVerdict) -> PolicyCondition {
    let (status, reason, message) = match &verdict.rejection {
        None => ("True", "Accepted", "in force".to_string()),
        Some(rejection) => ("False", "Invalid", rejection.clone()),
    };
    PolicyCondition {
        type_: ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: verdict.generation,
        last_transition_time: None,
    }
}

/// The verdicts whose condition differs from the one the object carries.
pub fn updates(objects: &SlimObjects, verdicts: &[PolicyVerdict]) -> Vec<StatusUpdate> {
    verdicts
        .iter()
        .filter_map(|verdict| {
            let object = objects.policies.get(&verdict.key)?;
            let wanted = condition_of(verdict);
            let current = object
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
            let same = current.is_some_and(|c| {
                (&c.status, &c.reason, &c.message, c.observed_generation)
                    == (
                        &wanted.status,
                        &wanted.reason,
                        &wanted.message,
                        wanted.observed_generation,
                    )
            });
            (!same).then(|| StatusUpdate {
                key: verdict.key.clone(),
                uid: object.metadata.uid.clone(),
                condition: wanted,
            })
        })
        .collect()
}

/// Writes policy statuses and Events on its own task.
pub struct StatusWriter {
    pending: watch::Sender<Vec<StatusUpdate>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StatusWriter {
    /// `instance` names this replica in the Events it writes.
    pub fn start(client: Client, instance: &str) -> Self {
        let (pending, mut updates) = watch::channel(Vec::<StatusUpdate>::new());
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "kanava-control-plane".into(),
                instance: Some(instance.to_string()),
            },
        );
        let task = tokio::spawn(async move {
            // What this replica wrote last, so a write is not repeated while
            // the watch has not shown it yet.
            let mut written: HashMap<ObjectKey, PolicyCondition> = HashMap::new();
            loop {
                let batch = updates.borrow_and_update().clone();
                let mut failed = false;
                for update in batch {
                    if written.get(&update.key) == Some(&update.condition) {
                        continue;
                    }
                    match write(&client, &recorder, &update).await {
                        Ok(()) => {
                            written.insert(update.key.clone(), update.condition.clone());
                        }
                        Err(error) => {
                            tracing::warn!(policy = %format!("{}/{}", update.key.0, update.key.1), %error, "cannot write the policy's status; retrying");
                            failed = true;
                        }
                    }
                }
                if failed {
                    tokio::time::sleep(RETRY_AFTER).await;
                    // Retry the latest batch, changed or not.
                    updates.mark_changed();
                }
                if updates.changed().await.is_err() {
                    return;
                }
            }
        });
        StatusWriter { pending, task }
    }

    /// Replaces what is still to be written.
    pub fn submit(&self, updates: Vec<StatusUpdate>) {
        if !updates.is_empty() || !self.pending.borrow().is_empty() {
            self.pending.send_replace(updates);
        }
    }
}

async fn write(
    client: &Client,
    recorder: &Recorder,
    update: &StatusUpdate,
) -> Result<(), kube::Error> {
    let (namespace, name) = &update.key;
    let api: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), namespace);
    let mut condition = update.condition.clone();
    condition.last_transition_time = Some(now_rfc3339());
    let patch = serde_json::json!({"status": {"conditions": [condition]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let accepted = update.condition.status == "True";
    tracing::info!(policy = %format!("{namespace}/{name}"), accepted, "policy status written");
    if !accepted {
        let reference = ObjectReference {
            api_version: Some(AuthorizationPolicy::api_version(&()).into()),
            kind: Some(AuthorizationPolicy::kind(&()).into()),
            namespace: Some(namespace.clone()),
            name: Some(name.clone()),
            uid: update.uid.clone(),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "Rejected".into(),
            note: Some(truncate(&update.condition.message, 1000)),
            action: "Validate".into(),
            secondary: None,
        };
        recorder.publish(&event, &reference).await?;
    }
    Ok(())
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kanava_cluster::crd::AuthorizationPolicyStatus;

    use super::*;

    fn objects_with(status: Option<AuthorizationPolicyStatus>) -> SlimObjects {
        let mut policy: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.kanava.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 2, "uid": "u"},
            "spec": {}
        }))
        .unwrap();
        policy.status = status;
        let mut objects = SlimObjects::default();
        objects
            .policies
            .insert(("shop".into(), "p".into()), Arc::new(policy));
        objects
    }

    fn verdict(rejection: Option<&str>, generation: i64) -> PolicyVerdict {
        PolicyVerdict {
            key: ("shop".into(), "p".into()),
            generation: Some(generation),
            rejection: rejection.map(str::to_string),
        }
    }

    #[test]
    fn only_a_status_that_differs_is_written() {
        let accepted = verdict(None, 2);
        let fresh = objects_with(None);
        let first = updates(&fresh, std::slice::from_ref(&accepted));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].condition.status, "True");
        assert_eq!(first[0].condition.observed_generation, Some(2));

        // The object already says so (with any transition time): nothing.
        let mut written = condition_of(&accepted);
        written.last_transition_time = Some("2026-11-29T08:00:00Z".into());
        let current = objects_with(Some(AuthorizationPolicyStatus {
            conditions: vec![written],
        }));
        assert!(updates(&current, std::slice::from_ref(&accepted)).is_empty());

        // A new generation, or a rejection, is written again.
        assert_eq!(updates(&current, &[verdict(None, 3)]).len(), 1);
        let rejected = updates(&current, &[verdict(Some("bad port"), 2)]);
        assert_eq!(rejected[0].condition.status, "False");
        assert_eq!(rejected[0].condition.reason, "Invalid");
        assert_eq!(rejected[0].condition.message, "bad port");
    }
}
