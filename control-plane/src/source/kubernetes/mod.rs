//! The Kubernetes API as the source of truth.
//!
//! One kube-rs watcher per kind (Namespaces, Pods, Services,
//! AuthorizationPolicies). The watcher does what a cluster demands: it lists,
//! then watches from the list's resourceVersion, asks for bookmarks so a
//! reconnect resumes where it left off, relists on `410 Gone`, and backs off
//! (0.8 s doubling to 30 s) while the API server is away instead of spinning.
//! Lists are read in pages, and every object is cut down to what the mesh
//! reads of it ([`kanava_cluster::slim`]) as it arrives.
//! Events go into a [`ClusterView`]; once every kind has had its initial
//! list, each new view goes to the same callback, translation and store as
//! the manifest directory's. Nothing is published before that, so no ztunnel
//! is ever sent a partial first snapshot that would be missing policies.
//! While the API server is unreachable the last view stays in force.

mod view;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kanava_cluster::crd::AuthorizationPolicy;
use kanava_cluster::{Kind, Object, SlimObject, SlimObjects};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

pub use view::{ClusterView, WATCHED};

/// How long the event streams must be quiet before a new view is published:
/// a burst (a Deployment rolling, a relist) becomes one translation.
const SETTLE: Duration = Duration::from_millis(10);
/// Longest a burst may delay publication.
const MAX_DELAY: Duration = Duration::from_millis(200);
/// Objects per page of a list: 100,000 pods are read as 200 answers of a
/// few megabytes, not one of hundreds, which neither the API server nor
/// this process holds whole.
const LIST_PAGE: u32 = 500;

/// Keeps the watches running; dropping it stops them.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A kind the control plane watches.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn into_object(self) -> Object;
}

impl Watched for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn into_object(self) -> Object {
        Object::Namespace(Arc::new(self))
    }
}

impl Watched for Pod {
    const KIND: Kind = Kind::Pod;
    fn into_object(self) -> Object {
        Object::Pod(Arc::new(self))
    }
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn into_object(self) -> Object {
        Object::Service(Arc::new(self))
    }
}

impl Watched for AuthorizationPolicy {
    const KIND: Kind = Kind::AuthorizationPolicy;
    fn into_object(self) -> Object {
        Object::AuthorizationPolicy(Arc::new(self))
    }
}

/// One kind's watch event, or its watch's error.
type KindEvent = (Kind, Result<watcher::Event<SlimObject>, watcher::Error>);

fn watch_kind<K: Watched>(client: &Client) -> impl Stream<Item = KindEvent> + Send + use<K> {
    let config = watcher::Config::default().page_size(LIST_PAGE);
    watcher(Api::<K>::all(client.clone()), config)
        .default_backoff()
        .map(|event| {
            // Only what the mesh reads is kept (and compared, so an update
            // the mesh does not see, such as a container restart count, is
            // no change); with 100,000 pods that is most of the memory.
            let event = event.map(|event| map_event(event, |o| K::into_object(o).slimmed()));
            (K::KIND, event)
        })
}

fn map_event<K>(
    event: watcher::Event<K>,
    f: impl Fn(K) -> SlimObject,
) -> watcher::Event<SlimObject> {
    match event {
        watcher::Event::Apply(object) => watcher::Event::Apply(f(object)),
        watcher::Event::Delete(object) => watcher::Event::Delete(f(object)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(f(object)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Watches the cluster through `client` and hands every new complete view to
/// `on_change` (on the watch's task; it should not block for long).
pub fn watch<F>(client: Client, mut on_change: F) -> Watch
where
    F: FnMut(&SlimObjects) + Send + 'static,
{
    let mut events = futures::stream::select_all([
        watch_kind::<Namespace>(&client).boxed(),
        watch_kind::<Pod>(&client).boxed(),
        watch_kind::<Service>(&client).boxed(),
        watch_kind::<AuthorizationPolicy>(&client).boxed(),
    ]);
    let task = tokio::spawn(async move {
        let mut view = ClusterView::default();
        let mut published = false;
        while let Some(event) = events.next().await {
            let mut changed = apply(&mut view, event);
            // Let a burst finish, within limits, before publishing.
            let deadline = tokio::time::Instant::now() + MAX_DELAY;
            while let Ok(Some(event)) = tokio::time::timeout(
                SETTLE.min(deadline - tokio::time::Instant::now()),
                events.next(),
            )
            .await
            {
                changed |= apply(&mut view, event);
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if !view.is_complete() {
                continue;
            }
            if !published {
                let objects = view.objects();
                tracing::info!(
                    namespaces = objects.namespaces.len(),
                    pods = objects.pods.len(),
                    services = objects.services.len(),
                    policies = objects.policies.len(),
                    "initial lists complete; serving discovery"
                );
            }
            if changed || !published {
                on_change(view.objects());
                published = true;
            }
        }
    });
    Watch { task }
}

fn apply(view: &mut ClusterView, (kind, event): KindEvent) -> bool {
    match event {
        Ok(event) => {
            if matches!(event, watcher::Event::InitDone) && !view.is_complete() {
                tracing::info!(%kind, "initial list complete");
            }
            view.apply(kind, event)
        }
        Err(error) => {
            // The watcher backs off and resumes (or relists) by itself; the
            // last view stays in force meanwhile.
            let waiting = if view.is_complete() {
                String::new()
            } else {
                format!(
                    "; discovery waits for the initial lists of {:?}",
                    view.unlisted()
                )
            };
            tracing::warn!(%kind, %error, "watch failed; retrying with backoff{waiting}");
            false
        }
    }
}
