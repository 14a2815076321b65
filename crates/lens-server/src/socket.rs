//! The Unix socket door's file: never delete what is not a stale socket of ours, never let
//! the socket exist with modes wider than 0600 (whatever the umask), remove it on the way out.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use crate::ServeError;

/// A bound socket and the inode its path names (so only that file is removed later).
pub struct Bound {
    pub listener: UnixListener,
    ino: u64,
}

impl std::ops::Deref for Bound {
    type Target = UnixListener;
    fn deref(&self) -> &UnixListener {
        &self.listener
    }
}

/// Bind a listener at `path`. A socket already there is replaced only when it is stale (no
/// server answers on it); any other file there is an error. The socket is made in a fresh
/// private directory beside `path`, given mode 0600, and only then linked to `path`, so it
/// is never reachable with other modes.
pub async fn bind(path: &Path) -> Result<Bound, ServeError> {
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::Config(format!(
                "{shown} exists and is not a socket; refusing to replace it"
            )));
        }
        match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing the stale socket {shown}");
                std::fs::remove_file(path)?;
            }
            Ok(Err(e)) => {
                return Err(ServeError::Config(format!(
                    "cannot check the socket {shown}: {e}"
                )))
            }
            Ok(Ok(_)) | Err(_) => {
                return Err(ServeError::Config(format!(
                    "another server is listening on {shown}"
                )))
            }
        }
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".logit-lens-")
        .tempdir_in(parent)?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    std::fs::hard_link(&staged, path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => ServeError::Config(format!(
            "{shown} appeared while binding; refusing to replace it"
        )),
        _ => ServeError::Io(e),
    })?;
    let ino = std::fs::symlink_metadata(path)?.ino();
    drop(private);
    Ok(Bound { listener, ino })
}

/// Remove the socket at `path` if it is still the one [`bind`] made.
pub fn remove(path: &Path, bound: &Bound) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == bound.ino) {
        let _ = std::fs::remove_file(path);
    }
}
