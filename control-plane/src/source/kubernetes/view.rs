//! What the watches have shown so far: the cluster objects, and whether
//! every kind has had its initial list.
//!
//! Pure bookkeeping over [`watcher::Event`]s, so it is tested with events
//! built from objects as the API server serves them, without a server.

use std::collections::{BTreeMap, BTreeSet};

use kanava_cluster::{Kind, SlimObject, SlimObjects};
use kube::runtime::watcher;

/// Every kind the control plane watches; the view is complete once each of
/// them has been listed.
pub const WATCHED: [Kind; 4] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::AuthorizationPolicy,
];

/// The cluster as the watches have shown it.
#[derive(Debug, Default)]
pub struct ClusterView {
    objects: SlimObjects,
    /// Kinds whose initial list has completed at least once.
    listed: BTreeSet<Kind>,
    /// Objects of a (re)list in progress, per kind. They replace that kind's
    /// objects only when the list is complete, so a relist after `410 Gone`
    /// or a dropped connection never shows a half-empty cluster.
    relisting: BTreeMap<Kind, Vec<SlimObject>>,
}

impl ClusterView {
    /// The objects seen so far.
    pub fn objects(&self) -> &SlimObjects {
        &self.objects
    }

    /// Whether every watched kind has had its initial list: until then the
    /// view must not be served, or policies could be missing.
    pub fn is_complete(&self) -> bool {
        WATCHED.iter().all(|kind| self.listed.contains(kind))
    }

    /// Kinds still waiting for their initial list.
    pub fn unlisted(&self) -> Vec<Kind> {
        WATCHED
            .into_iter()
            .filter(|kind| !self.listed.contains(kind))
            .collect()
    }

    /// Applies one event of `kind`'s watch. Returns whether the objects
    /// changed.
    pub fn apply(&mut self, kind: Kind, event: watcher::Event<SlimObject>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting.insert(kind, Vec::new());
                false
            }
            watcher::Event::InitApply(object) => {
                self.relisting.entry(kind).or_default().push(object);
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.remove(&kind).unwrap_or_default();
                self.listed.insert(kind);
                self.replace_kind(kind, listed)
            }
            watcher::Event::Apply(object) => {
                let id = object.id();
                let unchanged = self.get(&id).is_some_and(|current| current == object);
                if unchanged {
                    return false;
                }
                self.objects.insert(object);
                true
            }
            watcher::Event::Delete(object) => {
                let id = object.id();
                let present = self.get(&id).is_some();
                self.objects.remove(&id);
                present
            }
        }
    }

    fn get(&self, id: &kanava_cluster::ObjectId) -> Option<SlimObject> {
        let objects = &self.objects;
        match id.kind {
            Kind::Namespace => objects
                .namespaces
                .get(&id.key.1)
                .cloned()
                .map(SlimObject::Namespace),
            Kind::Pod => objects.pods.get(&id.key).cloned().map(SlimObject::Pod),
            Kind::Service => objects
                .services
                .get(&id.key)
                .cloned()
                .map(SlimObject::Service),
            Kind::AuthorizationPolicy => objects
                .policies
                .get(&id.key)
                .cloned()
                .map(SlimObject::AuthorizationPolicy),
        }
    }

    /// Makes `listed` the whole of `kind`. Objects equal to the ones held
    /// keep their shared copy, so the translation of an unchanged pod is
    /// reused after a relist.
    fn replace_kind(&mut self, kind: Kind, listed: Vec<SlimObject>) -> bool {
        let before: BTreeSet<_> = self.ids_of(kind);
        let mut changed = false;
        let mut after = BTreeSet::new();
        for object in listed {
            let id = object.id();
            if self.get(&id).as_ref() != Some(&object) {
                self.objects.insert(object);
                changed = true;
            }
            after.insert(id);
        }
        for gone in before.difference(&after) {
            self.objects.remove(gone);
            changed = true;
        }
        changed
    }

    fn ids_of(&self, kind: Kind) -> BTreeSet<kanava_cluster::ObjectId> {
        let objects = &self.objects;
        let keys: Vec<(String, String)> = match kind {
            Kind::Namespace => objects
                .namespaces
                .keys()
                .map(|name| (String::new(), name.clone()))
                .collect(),
            Kind::Pod => objects.pods.keys().cloned().collect(),
            Kind::Service => objects.services.keys().cloned().collect(),
            Kind::AuthorizationPolicy => objects.policies.keys().cloned().collect(),
        };
        keys.into_iter()
            .map(|key| kanava_cluster::ObjectId { kind, key })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    fn pod(name: &str, version: &str) -> SlimObject {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": name, "resourceVersion": version},
            "spec": {"containers": [], "nodeName": "node-1"},
            "status": {"podIP": "10.0.0.1"}
        }))
        .unwrap();
        kanava_cluster::Object::Pod(Arc::new(pod)).slimmed()
    }

    fn list_all_but_pods(view: &mut ClusterView) {
        for kind in [Kind::Namespace, Kind::Service, Kind::AuthorizationPolicy] {
            view.apply(kind, watcher::Event::Init);
            view.apply(kind, watcher::Event::InitDone);
        }
    }

    #[test]
    fn complete_only_once_every_kind_is_listed() {
        let mut view = ClusterView::default();
        list_all_but_pods(&mut view);
        assert!(!view.is_complete());
        assert_eq!(view.unlisted(), vec![Kind::Pod]);
        view.apply(Kind::Pod, watcher::Event::Init);
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("a", "1")));
        assert!(!view.is_complete(), "a list in progress is not a list");
        assert!(
            view.objects().pods.is_empty(),
            "nothing shown before InitDone"
        );
        assert!(view.apply(Kind::Pod, watcher::Event::InitDone));
        assert!(view.is_complete());
        assert_eq!(view.objects().pods.len(), 1);
    }

    #[test]
    fn a_relist_replaces_its_kind_only_when_complete_and_keeps_unchanged_objects() {
        let mut view = ClusterView::default();
        list_all_but_pods(&mut view);
        view.apply(Kind::Pod, watcher::Event::Init);
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("a", "1")));
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("b", "1")));
        view.apply(Kind::Pod, watcher::Event::InitDone);
        let a_before = view.objects().pods[&("shop".into(), "a".into())].clone();

        // After 410 Gone: a relist in which b is gone and c is new.
        view.apply(Kind::Pod, watcher::Event::Init);
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("a", "1")));
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("c", "1")));
        assert_eq!(
            view.objects().pods.len(),
            2,
            "old view in force while relisting"
        );
        assert!(view.apply(Kind::Pod, watcher::Event::InitDone));
        let names: Vec<&str> = view.objects().pods.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        let a_after = &view.objects().pods[&("shop".into(), "a".into())];
        assert!(
            Arc::ptr_eq(&a_before, a_after),
            "unchanged pod keeps its copy"
        );

        // The same relist again changes nothing.
        view.apply(Kind::Pod, watcher::Event::Init);
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("a", "1")));
        view.apply(Kind::Pod, watcher::Event::InitApply(pod("c", "1")));
        assert!(!view.apply(Kind::Pod, watcher::Event::InitDone));
    }

    #[test]
    fn applies_and_deletes() {
        let mut view = ClusterView::default();
        list_all_but_pods(&mut view);
        view.apply(Kind::Pod, watcher::Event::Init);
        view.apply(Kind::Pod, watcher::Event::InitDone);
        assert!(view.apply(Kind::Pod, watcher::Event::Apply(pod("a", "1"))));
        assert!(!view.apply(Kind::Pod, watcher::Event::Apply(pod("a", "1"))));
        assert!(view.apply(Kind::Pod, watcher::Event::Apply(pod("a", "2"))));
        assert!(view.apply(Kind::Pod, watcher::Event::Delete(pod("a", "3"))));
        assert!(!view.apply(Kind::Pod, watcher::Event::Delete(pod("a", "3"))));
        assert!(view.objects().pods.is_empty());
    }
}
