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
