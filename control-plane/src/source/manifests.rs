//! A directory of Kubernetes manifests as the source of truth.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file in the directory (not its
//! subdirectories; names starting with `.` are skipped, so writers can stage
//! a file and rename it into place) is read as a stream of Kubernetes
//! objects. The directory is watched with inotify; after a burst of changes
//! settles, the files that changed are read again and the new view is
//! published. Unchanged files are not read again: with ten thousand pods
//! one file each, a change costs one file, not ten thousand.
//!
//! A file that fails to parse is reported and its previous content stays in
//! force: a half-edited file never makes pods disappear from the mesh. When
//! two files define the same object, the one whose name sorts last wins.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use smallvec::SmallVec;
use tokio::sync::mpsc;

use crate::Error;
use kanava_cluster::{Object, ObjectId, SlimObject, SlimObjects, parse_manifests};

/// How long the directory must be quiet before changed files are read.
const SETTLE: Duration = Duration::from_millis(10);

/// Keeps the watch running; dropping it stops the watch.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads `dir` now and after every change, and hands the reader with each
/// new view to `on_change` (on the watch's task; it should not block for
/// long).
pub fn watch<F>(dir: PathBuf, mut on_change: F) -> Result<Watch, Error>
where
    F: FnMut(&DirectoryReader) + Send + 'static,
{
    let watch_error = |reason: String| Error::Watch {
        path: dir.clone(),
        reason,
    };
    if !dir.is_dir() {
        return Err(watch_error("not a directory".into()));
    }
    // Events name files by the watched path; reading by the same absolute,
    // canonical path keeps one name per file.
    let dir = std::fs::canonicalize(&dir).map_err(|e| watch_error(e.to_string()))?;
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events_tx.send(event);
    })
    .map_err(|e| watch_error(e.to_string()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| watch_error(e.to_string()))?;

    let mut reader = DirectoryReader::default();
    reader.read_all(&dir);
    let task = tokio::spawn(async move {
        on_change(&reader);
        while let Some(event) = events_rx.recv().await {
            let mut changed = BTreeSet::new();
            let mut rescan = false;
            let mut note = |event: notify::Result<notify::Event>| match event {
                // Our own reads show up as access events; only changes count.
                Ok(event) if changes_content(&event.kind) => changed.extend(event.paths),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "manifest directory watch error; reading it all again");
                    rescan = true;
                }
            };
            note(event);
            // Let a burst of writes finish before reading.
            loop {
                match tokio::time::timeout(SETTLE, events_rx.recv()).await {
                    Ok(Some(event)) => note(event),
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let modified = if rescan {
                reader.read_all(&dir)
            } else {
                reader.update(changed)
            };
            if modified {
                on_change(&reader);
            }
        }
    });
    Ok(Watch {
        _watcher: watcher,
        task,
    })
}

/// Reads a manifest directory, remembering each file's last good content.
/// `H` hashes object names (tests choose one whose hashes collide).
pub struct DirectoryReader<H = foldhash::fast::RandomState> {
    /// Each file's objects; nearly always one, held inline.
    files: BTreeMap<Arc<Path>, FileObjects>,
    /// The files that define objects, by a hash of the object's kind and
    /// name, in name order (of the files that define an object, the last
    /// wins): once per object a file defines with that hash. Keyed by the
    /// hash, not the name, so that 100,000 names are not held once more;
    /// which of the files define an object is read from the files
    /// themselves ([`Self::definers`]). Nearly always one file, inline.
    definers: HashMap<u64, SmallVec<[Arc<Path>; 1]>>,
    hasher: H,
    objects: SlimObjects,
    /// The newest numeric `resourceVersion` read so far, kept as objects
    /// come in: finding it among 100,000 objects on every change cost a
    /// fifth of the change.
    newest_resource_version: i64,
}

impl Default for DirectoryReader {
    fn default() -> Self {
        DirectoryReader::with_hasher(foldhash::fast::RandomState::default())
    }
}

impl<H: BuildHasher> DirectoryReader<H> {
    fn with_hasher(hasher: H) -> Self {
        DirectoryReader {
            files: BTreeMap::new(),
            definers: HashMap::new(),
            hasher,
            objects: SlimObjects::default(),
            newest_resource_version: 0,
        }
    }

    /// The current view.
    pub fn objects(&self) -> &SlimObjects {
        &self.objects
    }

    /// The newest numeric `resourceVersion` of any object read so far
    /// (removed ones included): once the view is served, every write up
    /// to that version has reached the store, whether it changed what
    /// ztunnels hold or not (the lab waits on it). 0 before any.
    pub fn newest_resource_version(&self) -> i64 {
        self.newest_resource_version
    }

    /// Reads every file of `dir`. Returns whether anything changed.
    pub fn read_all(&mut self, dir: &Path) -> bool {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot list manifest directory; keeping last view");
                return false;
            }
        };
        let mut paths: BTreeSet<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        // Files that disappeared are changes too.
        paths.extend(self.files.keys().map(|path| path.to_path_buf()));
        self.update(paths)
    }

    /// Reads `paths` again (or forgets them, if gone). Returns whether
    /// anything changed.
    pub fn update(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> bool {
        let mut touched: BTreeSet<ObjectId> = BTreeSet::new();
        for path in paths {
            if !is_manifest_name(&path) {
                continue;
            }
            let exists = path.is_file();
            let new = if exists {
                match read_file(&path) {
                    Ok(objects) => objects,
                    Err(reason) => {
                        tracing::error!(
                            file = %path.display(),
                            %reason,
                            kept_objects = self.files.get(path.as_path()).map_or(0, |objects| objects.len()),
                            "invalid manifest; its last good content stays in force"
                        );
                        continue;
                    }
                }
            } else {
                FileObjects::new()
            };
            // One copy of the path, shared by the file and its objects.
            let path: Arc<Path> = match self.files.get_key_value(path.as_path()) {
                Some((known, _)) => known.clone(),
                None => Arc::from(path),
            };
            let old = if !exists {
                self.files.remove(&path)
            } else {
                self.files.insert(path.clone(), new.clone())
            };
            if old.as_ref() == Some(&new) {
                continue;
            }
            for object in old.iter().flatten() {
                let id = object.id();
                let hash = self.hasher.hash_one(&id);
                if let Some(definers) = self.definers.get_mut(&hash) {
                    if let Ok(at) = definers.binary_search(&path) {
                        definers.remove(at);
                    }
                    if definers.is_empty() {
                        self.definers.remove(&hash);
                    }
                }
                touched.insert(id);
            }
            for object in &new {
                let id = object.id();
                let definers = self.definers.entry(self.hasher.hash_one(&id)).or_default();
                let (Ok(at) | Err(at)) = definers.binary_search(&path);
                definers.insert(at, path.clone());
                touched.insert(id);
            }
        }
        let changed = !touched.is_empty();
        // In name order, so a pod finds its siblings already in place to
        // share with (held only by its file, it is changed, not copied).
        for id in touched {
            let definers = self.definers(&id);
            let winner = definers
                .last()
                .cloned()
                .and_then(|file| self.files.get_mut(&file))
                .and_then(|objects| objects.iter_mut().rev().find(|o| o.id() == id));
            match winner {
                Some(object) => {
                    if let SlimObject::Pod(pod) = object {
                        self.objects.share_with_neighbours(pod);
                    }
                    if let Some(version) = object.resource_version().and_then(|v| v.parse().ok()) {
                        self.newest_resource_version = self.newest_resource_version.max(version);
                    }
                    if definers.len() > 1 {
                        tracing::warn!(object = %object.describe(), "object defined in more than one file; the last file wins");
                    }
                    self.objects.insert(object.clone());
                }
                None => {
                    self.objects.remove(&id);
                }
            }
        }
        changed
    }

    /// The files that define `id`, in name order.
    fn definers(&self, id: &ObjectId) -> SmallVec<[Arc<Path>; 1]> {
        let mut definers: SmallVec<[Arc<Path>; 1]> = SmallVec::new();
        for file in self
            .definers
            .get(&self.hasher.hash_one(id))
            .into_iter()
            .flatten()
        {
            let defines = self
                .files
                .get(file)
                .is_some_and(|objects| objects.iter().any(|object| object.id() == *id));
            if defines && definers.last() != Some(file) {
                definers.push(file.clone());
            }
        }
        definers
    }
}

/// Whether an event can change what a file holds. Opening and reading a
/// file are events too; reacting to them would make every read trigger the
/// next one.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Any
        | EventKind::Other => true,
    }
}

/// The objects of one file.
type FileObjects = SmallVec<[SlimObject; 1]>;

fn read_file(path: &Path) -> Result<FileObjects, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let (objects, others) = parse_manifests(&text).map_err(|e| e.to_string())?;
    for other in others {
        tracing::debug!(file = %path.display(), kind = %other.kind, "ignoring object of unused kind");
    }
    // Only what the mesh reads is kept (and compared, so a change the mesh
    // does not see is no change).
    Ok(objects.into_iter().map(Object::slimmed).collect())
}

fn is_manifest_name(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(extension, Some("yaml" | "yml" | "json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {containers: []}\n";

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, POD).unwrap();
        std::fs::write(dir.path().join(".staging.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut reader = DirectoryReader::default();
        assert!(reader.read_all(dir.path()));
        assert_eq!(reader.objects().pods.len(), 1);

        std::fs::write(&file, "kind: Pod\nspec: [").unwrap();
        assert!(!reader.update([file.clone()]));
        assert_eq!(reader.objects().pods.len(), 1, "kept the last good pod");

        std::fs::remove_file(&file).unwrap();
        assert!(reader.update([file.clone()]));
        assert_eq!(
            reader.objects().pods.len(),
            0,
            "a removed file takes its objects with it"
        );
    }

    #[test]
    fn the_last_file_wins_and_the_other_takes_over_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        std::fs::write(
            &a,
            POD.replace("containers: []", "containers: [], nodeName: from-a"),
        )
        .unwrap();
        std::fs::write(
            &b,
            POD.replace("containers: []", "containers: [], nodeName: from-b"),
        )
        .unwrap();
        let mut reader = DirectoryReader::default();
        reader.read_all(dir.path());
        let node = |reader: &DirectoryReader| {
            reader
                .objects()
                .pods
                .values()
                .next()
                .unwrap()
                .node_name
                .clone()
                .unwrap()
        };
        assert_eq!(node(&reader), "from-b");
        std::fs::remove_file(&b).unwrap();
        reader.update([b]);
        assert_eq!(node(&reader), "from-a");
    }

    /// Every object name hashes alike: which files define an object is
    /// still told by the files themselves.
    #[test]
    fn objects_whose_names_hash_alike_stay_apart() {
        #[derive(Default)]
        struct Constant;
        impl std::hash::Hasher for Constant {
            fn finish(&self) -> u64 {
                7
            }
            fn write(&mut self, _: &[u8]) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let write = |file: &str, pods: &[(&str, &str)]| {
            let text: Vec<String> = pods
                .iter()
                .map(|(name, node)| {
                    POD.replace("name: web", &format!("name: {name}")).replace(
                        "containers: []",
                        &format!("containers: [], nodeName: {node}"),
                    )
                })
                .collect();
            std::fs::write(dir.path().join(file), text.join("---\n")).unwrap();
            dir.path().join(file)
        };
        let mut reader =
            DirectoryReader::with_hasher(std::hash::BuildHasherDefault::<Constant>::default());
        let nodes = |reader: &DirectoryReader<_>| -> Vec<(String, String)> {
            reader
                .objects()
                .pods
                .values()
                .map(|pod| (pod.name.clone(), pod.node_name.clone().unwrap()))
                .collect()
        };
        let pair = |name: &str, node: &str| (name.to_string(), node.to_string());
        write("a.yaml", &[("one", "a"), ("two", "a")]);
        let b = write("b.yaml", &[("two", "b"), ("three", "b")]);
        reader.read_all(dir.path());
        assert_eq!(
            nodes(&reader),
            [pair("one", "a"), pair("three", "b"), pair("two", "b")]
        );
        // b.yaml no longer defines `two`: a.yaml's takes over; `three` goes.
        write("b.yaml", &[("four", "b")]);
        reader.update([b.clone()]);
        assert_eq!(
            nodes(&reader),
            [pair("four", "b"), pair("one", "a"), pair("two", "a")]
        );
        std::fs::remove_file(&b).unwrap();
        reader.update([b]);
        assert_eq!(nodes(&reader), [pair("one", "a"), pair("two", "a")]);
        assert_eq!(reader.definers.len(), 1, "one hash");
        assert_eq!(reader.definers[&7].len(), 2, "a.yaml, once per object");
    }

    #[test]
    fn remembers_the_newest_resource_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let versioned = |version: &str| {
            POD.replace(
                "namespace: shop}",
                &format!("namespace: shop, resourceVersion: \"{version}\"}}"),
            )
        };
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, versioned("7")).unwrap();
        let mut reader = DirectoryReader::default();
        assert_eq!(reader.newest_resource_version(), 0);
        reader.read_all(dir.path());
        assert_eq!(reader.newest_resource_version(), 7);
        // A version that is no number (a hand-written manifest's) is not one.
        std::fs::write(&b, versioned("draft").replace("web", "api")).unwrap();
        reader.update([b.clone()]);
        assert_eq!(reader.newest_resource_version(), 7);
        std::fs::write(&b, versioned("12").replace("web", "api")).unwrap();
        reader.update([b.clone()]);
        assert_eq!(reader.newest_resource_version(), 12);
        // A deletion was read too: the version does not go back.
        std::fs::remove_file(&b).unwrap();
        reader.update([b]);
        assert_eq!(reader.newest_resource_version(), 12);
    }

    /// A watch whose views arrive on a channel.
    fn watched(dir: &Path) -> (Watch, tokio::sync::watch::Receiver<SlimObjects>) {
        let (tx, rx) = tokio::sync::watch::channel(SlimObjects::default());
        let watch = watch(dir.to_path_buf(), move |reader| {
            tx.send_replace(reader.objects().clone());
        })
        .unwrap();
        (watch, rx)
    }

    #[tokio::test]
    async fn reading_files_does_not_trigger_reading_them_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), POD).unwrap();
        let (_watch, mut rx) = watched(dir.path());
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        rx.borrow_and_update();
        // Reading the file (as the reader itself does) must not publish.
        for _ in 0..5 {
            std::fs::read_to_string(dir.path().join("web.yaml")).unwrap();
        }
        let republished = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
        assert!(republished.is_err(), "a read was taken for a change");
    }

    #[tokio::test]
    async fn publishes_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (_watch, mut rx) = watched(dir.path());
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(rx.borrow_and_update().pods.is_empty());
        let tmp = dir.path().join(".web.yaml");
        std::fs::write(&tmp, POD).unwrap();
        std::fs::rename(&tmp, dir.path().join("web.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("change published")
            .unwrap();
        assert_eq!(rx.borrow().pods.len(), 1);
    }
}
