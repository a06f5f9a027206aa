//! Serves the control socket: peer uid checked with SO_PEERCRED, bounded request size, idle timeout
//! and connection count, so a slow or hostile client cannot stall the daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::protocol::{MAX_REQUEST, Request, Response};
use crate::config::ControlConfig;
use crate::engine::Engine;

/// Most control connections served at once; more are told so and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection idle this long between requests is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the control socket directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error(
        "control socket {0} is in use by a running daemon; stop it first or choose another [control] socket"
    )]
    InUse(PathBuf),
    #[error("cannot bind the control socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("cannot set mode/owner of the control socket {path}: {source}")]
    Permissions { path: PathBuf, source: std::io::Error },
    #[error("group `{0}` of [control] does not exist")]
    NoGroup(String),
}

/// Who may talk to the daemon.
#[derive(Clone, Debug)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gid: Option<u32>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || self.uids.contains(&uid) || self.gid == Some(gid)
    }
}

/// Binds the socket (replacing a stale one), sets its mode and group. Returns the listener and the
/// access rules: root, the daemon's own uid, `allowed_uids`, and members of `group`.
pub fn bind(config: &ControlConfig) -> Result<(UnixListener, Access), ServerError> {
    let path = &config.socket;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.clone()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.clone(),
        source,
    })?;
    let perm = |source| ServerError::Permissions {
        path: path.clone(),
        source,
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode)).map_err(perm)?;
    let gid = match &config.group {
        Some(name) => {
            let group = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| ServerError::NoGroup(name.clone()))?;
            nix::unistd::chown(path.as_path(), None, Some(group.gid)).map_err(|e| perm(e.into()))?;
            Some(group.gid.as_raw())
        }
        None => None,
    };
    let mut uids = config.allowed_uids.clone();
    uids.push(nix::unistd::geteuid().as_raw());
    Ok((listener, Access { uids, gid }))
}

/// Accepts control connections until `shutdown`.
pub async fn run(listener: UnixListener, access: Access, engine: Arc<Engine>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, "too many control connections; try again".into()));
            continue;
        };
        let (engine, access, shutdown) = (engine.clone(), access.clone(), shutdown.clone());
        tokio::spawn(async move {
            serve(stream, &access, &engine, &shutdown).await;
            drop(permit);
        });
    }
}

/// Answers with an error and closes. The pending request is read first: closing a Unix socket with
/// unread data makes the peer's read fail with ECONNRESET instead of showing the error.
async fn refuse(mut stream: UnixStream, message: String) {
    let mut discard = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut discard)).await;
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        write_response(&mut stream, &Response::error(message)),
    )
    .await;
}

async fn write_response<W: AsyncWriteExt + Unpin>(w: &mut W, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    w.write_all(&line).await
}

#[tracing::instrument(skip_all, fields(uid))]
async fn serve(stream: UnixStream, access: &Access, engine: &Arc<Engine>, shutdown: &CancellationToken) {
    let (uid, gid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.gid()),
        Err(e) => return refuse(stream, format!("cannot read peer credentials: {e}")).await,
    };
    tracing::Span::current().record("uid", uid);
    if !access.allows(uid, gid) {
        warn!(uid, "control connection refused: uid not allowed");
        return refuse(
            stream,
            format!("uid {uid} is not allowed to use this control socket"),
        )
        .await;
    }
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(IDLE_TIMEOUT, limited.read_until(b'\n', &mut line)) => r,
        };
        let response = match read {
            Err(_) | Ok(Err(_) | Ok(0)) => return,
            Ok(Ok(_)) if line.len() > MAX_REQUEST => {
                let _ = write_response(
                    &mut w,
                    &Response::error(format!("request longer than {MAX_REQUEST} bytes")),
                )
                .await;
                return;
            }
            // Off the async workers: a request may lock the state or walk the kernel's maps.
            Ok(Ok(_)) => {
                let (engine, request) = (engine.clone(), std::mem::take(&mut line));
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || span.in_scope(|| answer(&request, uid, &engine)))
                    .await
                    .unwrap_or_else(|e| Response::error(format!("the request failed: {e}")))
            }
        };
        let written = tokio::time::timeout(IDLE_TIMEOUT, write_response(&mut w, &response)).await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
}

fn answer(line: &[u8], uid: u32, engine: &Engine) -> Response {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Response::error("empty request; send one JSON object per line, e.g. {\"cmd\":\"status\"}");
    }
    let request = match Request::parse(text) {
        Ok(r) => r,
        Err(e) => return Response::error(e),
    };
    let changes = request.changes();
    if changes {
        info!(uid, request = %text, "operator command");
    }
    match engine.handle_from(request, Some(uid)) {
        Ok(v) => Response {
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => {
            if changes {
                warn!(uid, error = %e, "operator command failed");
            }
            Response::error(e)
        }
    }
}

/// Removes the socket file on shutdown.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}
