//! Writing files so that nobody ever reads them half-written.

use std::path::Path;

use crate::Error;

/// Writes a file through a temporary name starting with `.` and a rename,
/// so readers (the control plane's directory watch among them) never see it
/// half-written.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    std::fs::write(&tmp, contents).map_err(Error::io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("rename to {}", path.display())))
}

/// Writes `files` into `dir` as the kubelet lays out a projected volume
/// (a service-account token, its CA and namespace, a ConfigMap): the
/// contents in a timestamped directory, `..data` a link to it, and each
/// name a link through `..data`. An update writes a new directory and swaps
/// `..data` in one rename, as the kubelet does; readers that follow the
/// names always see one complete version. Programs that pass in the lab
/// must read these files by name, never by the layout of the directory.
pub fn write_projected_volume(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let version = format!("..{}_{:09}", stamp.as_secs(), stamp.subsec_nanos());
    let version_dir = dir.join(&version);
    std::fs::create_dir(&version_dir)
        .map_err(Error::io(format!("create {}", version_dir.display())))?;
    for (name, contents) in files {
        let path = version_dir.join(name);
        std::fs::write(&path, contents).map_err(Error::io(format!("write {}", path.display())))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(Error::io(format!("chmod {}", path.display())))?;
    }
    let data = dir.join("..data");
    let old = std::fs::read_link(&data).ok();
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&version, &staged)
        .map_err(Error::io(format!("link {}", staged.display())))?;
    std::fs::rename(&staged, &data).map_err(Error::io(format!("swap {}", data.display())))?;
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)
                .map_err(Error::io(format!("link {}", link.display())))?;
        }
    }
    if let Some(old) = old.filter(|old| *old != Path::new(&version)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}
