//! Atomic writes. Every file and checkpoint directory ril writes goes through here, so that a
//! process killed mid-write (or a full disk) leaves the previous version intact and no reader
//! ever sees a partial file.
//!
//! The temporary name is hidden (`.NAME.tmp-PID`), lives in the destination's directory (so the
//! rename never crosses a file system) and carries the process id (so two processes writing the
//! same path do not trample each other's temporary file).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An I/O failure of an atomic write, naming the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {action}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    /// What was being done ("creating", "writing", "syncing", "renaming into place", ...).
    pub action: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl WriteError {
    fn new(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Self {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
}

/// The hidden temporary sibling of `path` that [`write_atomic`] and friends write first.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically, creating the parent directories.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically through `fill`, which gets a buffered writer on the temporary file.
/// The temporary file is removed when `fill` or any later step fails.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> Result<(), WriteError>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).map_err(|e| WriteError::new(dir, "creating the directory", e))?;
    let tmp = temp_sibling(path);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| WriteError::new(&tmp, "creating", e))?;
        let mut writer = BufWriter::new(file);
        fill(&mut writer).map_err(|e| WriteError::new(&tmp, "writing", e))?;
        let file = writer
            .into_inner()
            .map_err(|e| WriteError::new(&tmp, "writing", e.into_error()))?;
        file.sync_all()
            .map_err(|e| WriteError::new(&tmp, "syncing", e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| WriteError::new(path, "renaming into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir);
    Ok(())
}

/// Moves a fully written directory `staged` to `dest` (replacing an existing `dest`) and makes
/// the rename durable. Every file inside `staged` must already be synced (write them with
/// [`write_atomic`] or sync them yourself). An existing `dest` is first moved aside and removed
/// only after the new one is in place, so one of the two always exists.
pub fn publish_dir(staged: &Path, dest: &Path) -> Result<(), WriteError> {
    let parent = parent_of(dest);
    sync_dir(staged);
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".{}.old-{}",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dest, &old)
            .map_err(|e| WriteError::new(dest, "moving the previous version aside", e))?;
        if let Err(e) = std::fs::rename(staged, dest) {
            // Put the previous version back: a failed publish changes nothing.
            let _ = std::fs::rename(&old, dest);
            return Err(WriteError::new(dest, "renaming into place", e));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staged, dest)
            .map_err(|e| WriteError::new(dest, "renaming into place", e))?;
    }
    sync_dir(parent);
    Ok(())
}

/// Makes a rename inside `dir` durable. Directories cannot be opened for syncing on every
/// platform, so a failure is logged at debug level, not returned.
pub fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot fsync the directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.json");
        write_atomic(&path, b"first version, long").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(leftovers(&dir.path().join("nested")).is_empty());
    }

    #[test]
    fn a_failing_writer_keeps_the_previous_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"good").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"half of the new ")?;
            Err(std::io::Error::other("disk full (injected)"))
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("disk full (injected)"), "{text}");
        assert!(text.contains(".state.json.tmp-"), "{text}");
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn a_write_into_an_unwritable_place_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the parent directory should be.
        std::fs::write(dir.path().join("blocker"), b"x").unwrap();
        let err = write_atomic(&dir.path().join("blocker/state.json"), b"x").unwrap_err();
        assert!(err.to_string().contains("blocker"), "{err}");
    }

    #[test]
    fn publishing_a_directory_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("checkpoint-000001");
        for version in ["one", "two"] {
            let staged = dir.path().join(format!(".staged-{version}"));
            std::fs::create_dir_all(&staged).unwrap();
            write_atomic(&staged.join("model.safetensors"), version.as_bytes()).unwrap();
            if version == "one" {
                write_atomic(&staged.join("only-in-one"), b"x").unwrap();
            }
            publish_dir(&staged, &dest).unwrap();
            assert!(!staged.exists());
        }
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"two"
        );
        assert!(!dest.join("only-in-one").exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn a_failed_publish_keeps_the_previous_directory() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ckpt");
        std::fs::create_dir_all(&dest).unwrap();
        write_atomic(&dest.join("model.safetensors"), b"old").unwrap();
        let err = publish_dir(&dir.path().join("never-written"), &dest).unwrap_err();
        assert!(err.to_string().contains("ckpt"), "{err}");
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"old"
        );
    }
}
