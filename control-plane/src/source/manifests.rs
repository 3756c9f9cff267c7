//! A directory of Kubernetes manifests as the source of truth.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file in the directory (not its
//! subdirectories; names starting with `.` are skipped, so writers can stage
//! a file and rename it into place) is read as a stream of Kubernetes
//! objects. The directory is watched with inotify; after a burst of changes
//! settles, the whole directory is read again and the new view published.
//!
//! A file that fails to parse is reported and its previous content stays in
//! force: a half-edited file never makes pods disappear from the mesh.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};

use super::{ClusterObjects, Object, parse_manifests};
use crate::Error;

/// How long the directory must be quiet before it is read again.
const SETTLE: Duration = Duration::from_millis(30);

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

/// Reads `dir` now and after every change, publishing each view on `out`.
pub fn watch(dir: PathBuf, out: watch::Sender<ClusterObjects>) -> Result<Watch, Error> {
    let watch_error = |reason: String| Error::Watch {
        path: dir.clone(),
        reason,
    };
    if !dir.is_dir() {
        return Err(watch_error("not a directory".into()));
    }
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events_tx.send(event);
    })
    .map_err(|e| watch_error(e.to_string()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| watch_error(e.to_string()))?;

    let mut reader = DirectoryReader::default();
    out.send_replace(reader.read(&dir));
    let task = tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "manifest directory watch error; reading again");
            }
            // Let a burst of writes finish before reading.
            loop {
                match tokio::time::timeout(SETTLE, events_rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let objects = reader.read(&dir);
            out.send_if_modified(|current| {
                if *current == objects {
                    false
                } else {
                    *current = objects;
                    true
                }
            });
        }
    });
    Ok(Watch {
        _watcher: watcher,
        task,
    })
}

/// Reads a manifest directory, remembering each file's last good content.
#[derive(Default)]
pub struct DirectoryReader {
    last_good: HashMap<PathBuf, Vec<Object>>,
}

impl DirectoryReader {
    pub fn read(&mut self, dir: &Path) -> ClusterObjects {
        let mut files: BTreeMap<PathBuf, Vec<Object>> = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot list manifest directory; keeping last view");
                return self.assemble(self.last_good.clone().into_iter().collect());
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_manifests(&text).map_err(|e| e.to_string()));
            match parsed {
                Ok((objects, others)) => {
                    for other in others {
                        tracing::debug!(file = %path.display(), kind = %other.kind, "ignoring object of unused kind");
                    }
                    self.last_good.insert(path.clone(), objects.clone());
                    files.insert(path, objects);
                }
                Err(reason) => {
                    let kept = self.last_good.get(&path).cloned().unwrap_or_default();
                    tracing::error!(
                        file = %path.display(),
                        %reason,
                        kept_objects = kept.len(),
                        "invalid manifest; its last good content stays in force"
                    );
                    files.insert(path, kept);
                }
            }
        }
        // Forget files that were removed.
        self.last_good.retain(|path, _| files.contains_key(path));
        self.assemble(files)
    }

    fn assemble(&self, files: BTreeMap<PathBuf, Vec<Object>>) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for (path, file_objects) in files {
            for object in file_objects {
                if let Some(replaced) = objects.insert(object) {
                    tracing::warn!(file = %path.display(), object = %replaced, "object defined twice; the later file wins");
                }
            }
        }
        objects
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    path.is_file() && !hidden && matches!(extension, Some("yaml" | "yml" | "json"))
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
        assert_eq!(reader.read(dir.path()).pods.len(), 1);

        std::fs::write(&file, "kind: Pod\nspec: [").unwrap();
        assert_eq!(
            reader.read(dir.path()).pods.len(),
            1,
            "kept the last good pod"
        );

        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            reader.read(dir.path()).pods.len(),
            0,
            "a removed file takes its objects with it"
        );
    }

    #[tokio::test]
    async fn publishes_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = watch::channel(ClusterObjects::default());
        let _watch = watch(dir.path().to_path_buf(), tx).unwrap();
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
