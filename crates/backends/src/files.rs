//! Files and folders only the node's own user can reach: private objects, invocation payloads
//! and results, tokens' hashes and cached derivatives all live in the data folder, so every
//! folder the adapters make is created `0700` and every file `0600` (whatever the umask), and
//! SQLite files are made `0600` before SQLite opens them (its `-wal` and `-shm` files take the
//! main file's mode). On other platforms these are the plain calls.

use std::io;
use std::path::Path;

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

/// The mode of the folders the node makes.
pub const DIR_MODE: u32 = 0o700;
/// The mode of the files the node makes.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` and its missing parents, each new one `0700`.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(DIR_MODE);
    builder.create(path)
}

/// [`create_dir_all`] for async callers.
pub async fn create_dir_all_async(path: &Path) -> io::Result<()> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(DIR_MODE);
    builder.create(path).await
}

/// Options that create files `0600` (add `create`, `create_new`, `write`, ... as needed).
pub fn open_options() -> std::fs::OpenOptions {
    #[allow(unused_mut, reason = "the mode is set on unix only")]
    let mut opts = std::fs::OpenOptions::new();
    #[cfg(unix)]
    opts.mode(FILE_MODE);
    opts
}

/// [`open_options`] for async callers.
pub fn open_options_async() -> tokio::fs::OpenOptions {
    tokio::fs::OpenOptions::from(open_options())
}

/// Makes sure the SQLite file `path` exists and only its owner can read it, before SQLite opens
/// it: created empty `0600` when missing (SQLite then gives its journal files that mode), its
/// mode and that of the journal files left beside it narrowed to `0600` when wider.
pub fn prepare_database(path: &Path) -> io::Result<()> {
    open_options().write(true).create(true).truncate(false).open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match narrow(Path::new(&name), FILE_MODE) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

/// Makes the folder `path` private: created `0700` when missing (with its parents); an existing
/// one that its group or others could reach is narrowed to `0700`. Returns the mode it had when
/// it was narrowed, for the caller to log.
pub fn private_dir(path: &Path) -> io::Result<Option<u32>> {
    if !path.exists() {
        create_dir_all(path)?;
        return Ok(None);
    }
    narrow(path, DIR_MODE)
}

/// Sets `mode` on `path` when its current mode grants group or others anything; returns the
/// mode it had then.
#[cfg(unix)]
fn narrow(path: &Path, mode: u32) -> io::Result<Option<u32>> {
    let before = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if before & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(Some(before))
}

#[cfg(not(unix))]
fn narrow(path: &Path, _mode: u32) -> io::Result<Option<u32>> {
    std::fs::metadata(path).map(|_| None)
}

/// The permission bits of `path` (tests).
#[cfg(unix)]
pub fn mode(path: &Path) -> io::Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pixflow-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn folders_are_made_private_and_open_ones_narrowed() {
        let d = scratch("dirs");
        assert_eq!(private_dir(&d.join("a/b")).unwrap(), None);
        assert_eq!((mode(&d).unwrap(), mode(&d.join("a/b")).unwrap()), (0o700, 0o700));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&d).unwrap(), Some(0o755));
        assert_eq!(mode(&d).unwrap(), 0o700);
        assert_eq!(private_dir(&d).unwrap(), None, "a private folder is left alone");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_and_databases_are_private() {
        let d = scratch("files");
        create_dir_all(&d).unwrap();
        open_options().write(true).create_new(true).open(d.join("f")).unwrap();
        assert_eq!(mode(&d.join("f")).unwrap(), 0o600);
        // An existing database and its journal, readable by all, are narrowed; bytes are kept.
        std::fs::write(d.join("s.db"), b"kept").unwrap();
        std::fs::write(d.join("s.db-wal"), b"").unwrap();
        for f in ["s.db", "s.db-wal"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        prepare_database(&d.join("s.db")).unwrap();
        prepare_database(&d.join("new.db")).unwrap();
        for f in ["s.db", "s.db-wal", "new.db"] {
            assert_eq!(mode(&d.join(f)).unwrap(), 0o600, "{f}");
        }
        assert_eq!(std::fs::read(d.join("s.db")).unwrap(), b"kept");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
