//! [`TempDir`]: a temporary directory (the `tempfile` crate's) named after a test tag, mode 0755 so
//! a non-root uid can reach a control socket inside, removed with its contents on drop.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A directory under the system temp dir (or under another directory), removed on drop.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// `<tmp>/<unique_prefix(tag)>.XXXXXX`, mode 0755. Panics on failure (test code).
    pub fn new(tag: &str) -> TempDir {
        TempDir::try_new(tag).unwrap_or_else(|e| panic!("creating a temp dir for {tag}: {e}"))
    }

    /// Like [`TempDir::new`], with the error returned.
    pub fn try_new(tag: &str) -> io::Result<TempDir> {
        TempDir::try_in(&std::env::temp_dir(), &crate::unique_prefix(tag))
    }

    /// `<parent>/<name>.XXXXXX`, mode 0755.
    pub fn try_in(parent: &Path, name: &str) -> io::Result<TempDir> {
        tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .permissions(Permissions::from_mode(0o755))
            .tempdir_in(parent)
            .map(TempDir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// A subdirectory (created if missing).
    pub fn sub(&self, name: &str) -> io::Result<PathBuf> {
        let p = self.path().join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dir_is_0755_and_removed_on_drop() {
        let dir = TempDir::new("tmpd");
        let path = dir.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        std::fs::write(dir.sub("a").unwrap().join("f"), "x").unwrap();
        drop(dir);
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
