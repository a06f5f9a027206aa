//! Serves the control socket: peer uid checked with SO_PEERCRED, bounded request size, idle timeouts
//! and connection count, so a slow or hostile client cannot stall the daemon. Credentials are
//! checked before a connection takes a slot, and root has [`ROOT_SLOTS`] slots of its own, so
//! local connections that use up the ordinary slots never lock the administrator out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::protocol::{MAX_REQUEST, Request, Response};
use crate::config::ControlConfig;
use crate::engine::Engine;

/// Most control connections served at once (any allowed uid); more are told so and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Further connections only root (uid 0) may take once the ordinary ones are all in use.
pub const ROOT_SLOTS: usize = 4;
/// A new connection must send its first request within this time.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle this long between requests is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most refusals being written at once; connections beyond are closed without an answer.
const MAX_REFUSING: usize = 16;

/// How many connections the server takes and how long they may stay idle.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub root_slots: usize,
    pub first_request: Duration,
    pub idle: Duration,
}

impl Default for Limits {
    /// [`MAX_CONNECTIONS`], [`ROOT_SLOTS`], [`FIRST_REQUEST_TIMEOUT`], [`IDLE_TIMEOUT`].
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            root_slots: ROOT_SLOTS,
            first_request: FIRST_REQUEST_TIMEOUT,
            idle: IDLE_TIMEOUT,
        }
    }
}

/// The connection slots: ordinary ones for every allowed uid, and root's own.
struct Slots {
    ordinary: Arc<Semaphore>,
    root: Arc<Semaphore>,
}

impl Slots {
    fn new(limits: &Limits) -> Self {
        Slots {
            ordinary: Arc::new(Semaphore::new(limits.connections)),
            root: Arc::new(Semaphore::new(limits.root_slots)),
        }
    }

    /// An ordinary slot, else (for root only) one of root's.
    fn take(&self, uid: u32) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.ordinary.clone().try_acquire_owned() {
            return Some(p);
        }
        if uid == 0 {
            return self.root.clone().try_acquire_owned().ok();
        }
        None
    }
}

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

/// Accepts control connections until `shutdown`, with the default [`Limits`].
pub async fn run(listener: UnixListener, access: Access, engine: Arc<Engine>, shutdown: CancellationToken) {
    run_limited(listener, access, engine, shutdown, Limits::default()).await;
}

/// Accepts control connections until `shutdown`. A peer's credentials (SO_PEERCRED) are read as
/// it is accepted: a uid not allowed is refused without taking a slot, root may take one of its
/// own slots once the ordinary ones are in use.
pub async fn run_limited(
    listener: UnixListener,
    access: Access,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let slots = Slots::new(&limits);
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
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
        let refuse_with = |stream, message: String| {
            // Refusals are bounded too: beyond MAX_REFUSING the connection is closed unanswered.
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, message).await;
                    drop(p);
                });
            }
        };
        let (uid, gid) = match stream.peer_cred() {
            Ok(c) => (c.uid(), c.gid()),
            Err(e) => {
                refuse_with(stream, format!("cannot read peer credentials: {e}"));
                continue;
            }
        };
        if !access.allows(uid, gid) {
            warn!(uid, "control connection refused: uid not allowed");
            refuse_with(
                stream,
                format!("uid {uid} is not allowed to use this control socket"),
            );
            continue;
        }
        let Some(permit) = slots.take(uid) else {
            warn!(uid, "control connection refused: every connection slot is in use");
            refuse_with(
                stream,
                format!(
                    "too many control connections ({} open; idle ones close after {} s); try again, \
                     or as root, which has {} connections of its own",
                    limits.connections,
                    limits.idle.as_secs(),
                    limits.root_slots
                ),
            );
            continue;
        };
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        tokio::spawn(async move {
            serve(stream, uid, &engine, &shutdown, &limits).await;
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
async fn serve(
    stream: UnixStream,
    uid: u32,
    engine: &Arc<Engine>,
    shutdown: &CancellationToken,
    limits: &Limits,
) {
    tracing::Span::current().record("uid", uid);
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    let mut wait = limits.first_request;
    loop {
        line.clear();
        // A request of MAX_REQUEST bytes, its newline, and one byte more to tell a longer one.
        let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 2);
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(wait, limited.read_until(b'\n', &mut line)) => r,
        };
        wait = limits.idle;
        let response = match read {
            Err(_) | Ok(Err(_) | Ok(0)) => return,
            Ok(Ok(_)) if line.strip_suffix(b"\n").unwrap_or(&line).len() > MAX_REQUEST => {
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
        let written = tokio::time::timeout(limits.idle, write_response(&mut w, &response)).await;
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
        info!(uid, request = %masked(text), "operator command");
    }
    match engine.handle_from(request, Some(uid)) {
        Ok(v) => Response {
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => {
            let text = crate::report::chain(&e);
            if changes {
                // Debug-quoted: the text may repeat names from the request, newlines and all.
                warn!(uid, error = ?text, "operator command failed");
            }
            Response::error(text)
        }
    }
}

/// A request line as the log shows it: the value of every key naming a secret (`secret`,
/// `backend_secret`, at any depth) replaced by `(hidden)`. Text that is not JSON is not shown at
/// all, only its length, since where a secret sits in it cannot be told.
fn masked(text: &str) -> String {
    fn hide(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, v) in fields.iter_mut() {
                    if key.to_ascii_lowercase().contains("secret") {
                        *v = serde_json::Value::from(crate::config::HIDDEN);
                    } else {
                        hide(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(hide),
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(mut value) => {
            hide(&mut value);
            value.to_string()
        }
        Err(_) => format!("({} bytes, not JSON)", text.len()),
    }
}

/// Removes the socket file on shutdown.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests;
