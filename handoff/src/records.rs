//! Pod records: `<dir>/<pod uid>.json`, one per pod the CNI plugin set up on
//! this node, enrolled or not.
//!
//! The directory lives under `/var/run` (a tmpfs): records vanish with the
//! node's pods on reboot. Files are written whole (temporary file, then
//! rename), so a reader never sees half a record.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Records larger than this are not read (a record is well under 1 KiB).
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// What the node knows about one pod's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub uid: String,
    /// The runtime's id of the pod's sandbox (`CNI_CONTAINERID`): a DEL
    /// may come without the pod's uid.
    pub container_id: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's IPs, as its network plugin assigned them.
    pub ips: Vec<String>,
    /// The path of its network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The inode of that namespace: a path reused by a later pod names a
    /// different namespace.
    pub netns_inode: u64,
}

impl PodRecord {
    /// Opens the pod's network namespace, if the path still names the
    /// namespace this record was written for.
    pub fn open_netns(&self) -> Result<std::fs::File, Error> {
        let file = std::fs::File::open(&self.netns)
            .map_err(Error::io(format!("open {}", self.netns.display())))?;
        let inode = rustix::fs::fstat(&file)
            .map_err(|e| Error::Io {
                context: format!("stat {}", self.netns.display()),
                source: e.into(),
            })?
            .st_ino;
        if inode != self.netns_inode {
            return Err(Error::BadRecord {
                path: self.netns.display().to_string(),
                reason: format!(
                    "now names another network namespace (inode {inode}, recorded {})",
                    self.netns_inode
                ),
            });
        }
        Ok(file)
    }
}

/// The inode of the network namespace at `path`, for a new record.
pub fn netns_inode(netns: &std::fs::File) -> Result<u64, Error> {
    rustix::fs::fstat(netns)
        .map(|stat| stat.st_ino)
        .map_err(|e| Error::Io {
            context: "stat the network namespace".into(),
            source: e.into(),
        })
}

/// The directory of pod records.
#[derive(Clone, Debug)]
pub struct RecordDir {
    dir: PathBuf,
}

impl RecordDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RecordDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Stores a record, replacing one of the same pod.
    pub fn write(&self, record: &PodRecord) -> Result<(), Error> {
        let path = self.file(&record.uid)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(Error::io(format!("create {}", self.dir.display())))?;
        let temporary = self.dir.join(format!(".{}.tmp", record.uid));
        let contents = serde_json::to_vec(record).map_err(|e| Error::BadRecord {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| file.write_all(&contents).and_then(|()| file.sync_all()))
            .map_err(Error::io(format!("write {}", temporary.display())))?;
        std::fs::rename(&temporary, &path)
            .map_err(Error::io(format!("rename to {}", path.display())))
    }

    /// Reads the record of a pod, if there is one.
    pub fn read(&self, uid: &str) -> Result<Option<PodRecord>, Error> {
        let path = self.file(uid)?;
        match std::fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Error::io(format!("stat {}", path.display()))(error)),
            Ok(meta) if meta.len() > MAX_RECORD_BYTES => {
                return Err(Error::BadRecord {
                    path: path.display().to_string(),
                    reason: format!("larger than {MAX_RECORD_BYTES} bytes"),
                });
            }
            Ok(_) => {}
        }
        let bytes = std::fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
        let record: PodRecord = serde_json::from_slice(&bytes).map_err(|e| Error::BadRecord {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if record.uid != uid {
            return Err(Error::BadRecord {
                path: path.display().to_string(),
                reason: format!("it is about pod uid {:?}", record.uid),
            });
        }
        Ok(Some(record))
    }

    /// Removes a pod's record; a missing one is fine.
    pub fn remove(&self, uid: &str) -> Result<(), Error> {
        let path = self.file(uid)?;
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", path.display()))(error))
            }
            _ => Ok(()),
        }
    }

    /// The uids of every recorded pod (none when the directory is missing).
    pub fn uids(&self) -> Result<Vec<String>, Error> {
        let entries = match std::fs::read_dir(&self.dir) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other.map_err(Error::io(format!("list {}", self.dir.display())))?,
        };
        let mut uids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let uid = name.strip_suffix(".json")?;
                check_uid(uid).ok().map(|()| uid.to_string())
            })
            .collect();
        uids.sort();
        Ok(uids)
    }

    fn file(&self, uid: &str) -> Result<PathBuf, Error> {
        check_uid(uid)?;
        Ok(self.dir.join(format!("{uid}.json")))
    }
}

/// A uid becomes a file name: only what Kubernetes uids are made of.
pub fn check_uid(uid: &str) -> Result<(), Error> {
    let plain = !uid.is_empty()
        && uid.len() <= 128
        && !uid.starts_with('-')
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if plain {
        Ok(())
    } else {
        Err(Error::BadUid(format!("{uid:?}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(uid: &str, netns: &Path, inode: u64) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            container_id: format!("sandbox-{uid}"),
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            ips: vec!["10.244.1.2".into()],
            netns: netns.into(),
            netns_inode: inode,
        }
    }

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let records = RecordDir::new(dir.path().join("pods"));
        assert_eq!(records.uids().unwrap(), Vec::<String>::new());
        let one = record("4f7c-1", Path::new("/proc/self/ns/net"), 1);
        records.write(&one).unwrap();
        assert_eq!(records.read("4f7c-1").unwrap(), Some(one));
        assert_eq!(records.uids().unwrap(), vec!["4f7c-1".to_string()]);
        records.remove("4f7c-1").unwrap();
        records.remove("4f7c-1").unwrap();
        assert_eq!(records.read("4f7c-1").unwrap(), None);
    }

    #[test]
    fn uids_that_are_not_plain_names_are_refused() {
        let records = RecordDir::new("/nonexistent");
        for uid in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "-x",
            &"a".repeat(129),
        ] {
            assert!(matches!(records.read(uid), Err(Error::BadUid(_))), "{uid}");
        }
    }

    #[test]
    fn a_record_opens_only_the_namespace_it_was_written_for() {
        let own = std::fs::File::open("/proc/self/ns/net").unwrap();
        let inode = netns_inode(&own).unwrap();
        let path = Path::new("/proc/self/ns/net");
        assert!(record("a", path, inode).open_netns().is_ok());
        let recycled = record("a", path, inode + 1).open_netns().unwrap_err();
        assert!(
            recycled.to_string().contains("another network namespace"),
            "{recycled}"
        );
        assert!(
            record("a", Path::new("/nonexistent/ns"), inode)
                .open_netns()
                .is_err()
        );
    }

    #[test]
    fn a_record_under_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let records = RecordDir::new(dir.path());
        std::fs::write(
            dir.path().join("b.json"),
            serde_json::to_vec(&record("a", Path::new("/x"), 1)).unwrap(),
        )
        .unwrap();
        assert!(
            records
                .read("b")
                .unwrap_err()
                .to_string()
                .contains("pod uid")
        );
        std::fs::write(dir.path().join("c.json"), b"{garbage").unwrap();
        assert!(records.read("c").is_err());
    }
}
