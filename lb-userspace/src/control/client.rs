//! The CLI's side of the control socket: finding it ([`discover`]) and sending one request
//! ([`call`]).

use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::protocol::{Request, Response};
use crate::config::DEFAULT_SOCKET;

/// Environment variable naming the control socket (an empty value is ignored).
pub const SOCKET_ENV: &str = "LB_SOCKET";
/// The config file the client commands read `[control] socket` from when given no flag.
pub const SYSTEM_CONFIG: &str = "/etc/lb/lb.toml";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the control socket {path}{how}: {error} (is `lb run` running? use -c FILE or --socket PATH to point elsewhere)"
    )]
    Connect {
        path: String,
        /// " (from …)" when known.
        how: String,
        error: std::io::Error,
    },
    #[error("cannot read the control socket from {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an unreadable response: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the daemon closed the connection without answering")]
    Closed,
}

/// Where the client found the socket path: said in connection errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSource {
    /// `--socket PATH`.
    Flag,
    /// `-c FILE`'s `[control] socket` (or its default when the file sets none).
    Config(PathBuf),
    /// `$LB_SOCKET`.
    Env,
    /// The system config file's `[control] socket`.
    SystemConfig(PathBuf),
    /// Nothing given and no system config: the built-in default.
    Default,
}

impl fmt::Display for SocketSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketSource::Flag => write!(f, "from --socket"),
            SocketSource::Config(p) | SocketSource::SystemConfig(p) => write!(f, "from {}", p.display()),
            SocketSource::Env => write!(f, "from ${SOCKET_ENV}"),
            SocketSource::Default => write!(f, "the default"),
        }
    }
}

/// The part of a config file the client reads; everything else is ignored, so a file with an
/// error elsewhere (being edited before a reload) still names its socket.
#[derive(Deserialize)]
struct ControlOnly {
    control: Option<SocketOnly>,
}

#[derive(Deserialize)]
struct SocketOnly {
    socket: Option<PathBuf>,
}

/// `[control] socket` of the config file at `path`, or the default when the file sets none.
pub fn socket_of_config(path: &Path) -> Result<PathBuf, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| ClientError::Config {
        path: path.into(),
        message: e.to_string(),
    })?;
    let parsed: ControlOnly = toml::from_str(&text).map_err(|e| ClientError::Config {
        path: path.into(),
        message: e.to_string(),
    })?;
    Ok(parsed
        .control
        .and_then(|c| c.socket)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)))
}

/// The control socket a client command talks to, first match wins: `--socket`, `-c FILE`'s
/// `[control] socket`, a non-empty `$LB_SOCKET` (`env`), the `[control] socket` of
/// `system_config` (normally [`SYSTEM_CONFIG`]) when that file exists, then [`DEFAULT_SOCKET`].
pub fn discover(
    flag: Option<&Path>,
    config: Option<&Path>,
    env: Option<&OsStr>,
    system_config: &Path,
) -> Result<(PathBuf, SocketSource), ClientError> {
    if let Some(p) = flag {
        return Ok((p.into(), SocketSource::Flag));
    }
    if let Some(c) = config {
        return Ok((socket_of_config(c)?, SocketSource::Config(c.into())));
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return Ok((PathBuf::from(e), SocketSource::Env));
    }
    if system_config.exists() {
        return Ok((
            socket_of_config(system_config)?,
            SocketSource::SystemConfig(system_config.into()),
        ));
    }
    Ok((PathBuf::from(DEFAULT_SOCKET), SocketSource::Default))
}

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    send(socket, String::new(), request)
}

/// [`call`] on the socket found by [`discover`]; a connection error says where the path came from.
pub fn call_found(socket: &Path, how: &SocketSource, request: &Request) -> Result<Response, ClientError> {
    send(socket, format!(" ({how})"), request)
}

fn send(socket: &Path, how: String, request: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|error| ClientError::Connect {
        path: socket.display().to_string(),
        how,
        error,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    if reader.read_line(&mut answer)? == 0 {
        return Err(ClientError::Closed);
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn discovery_order_flag_config_env_system_default() {
        let dir = tempfile::tempdir().unwrap();
        let own = file(dir.path(), "own.toml", "[control]\nsocket = \"/tmp/own.sock\"\n");
        let sys = file(
            dir.path(),
            "sys.toml",
            "log_level = \"info\"\n[control]\nsocket = \"/tmp/sys.sock\"\nmode = 0o660\n",
        );
        let missing = dir.path().join("missing.toml");
        let env = OsStr::new("/tmp/env.sock");
        let flag = Path::new("/tmp/flag.sock");
        let got = |f, c, e, s| discover(f, c, e, s).unwrap();

        assert_eq!(
            got(Some(flag), Some(&own), Some(env), &sys),
            (flag.into(), SocketSource::Flag)
        );
        assert_eq!(
            got(None, Some(&own), Some(env), &sys),
            ("/tmp/own.sock".into(), SocketSource::Config(own.clone()))
        );
        assert_eq!(
            got(None, None, Some(env), &sys),
            ("/tmp/env.sock".into(), SocketSource::Env)
        );
        assert_eq!(
            got(None, None, None, &sys),
            ("/tmp/sys.sock".into(), SocketSource::SystemConfig(sys.clone()))
        );
        // An empty $LB_SOCKET is ignored: the system config answers.
        assert_eq!(
            got(None, None, Some(OsStr::new("")), &sys),
            ("/tmp/sys.sock".into(), SocketSource::SystemConfig(sys.clone()))
        );
        assert_eq!(
            got(None, None, Some(OsStr::new("")), &missing),
            (DEFAULT_SOCKET.into(), SocketSource::Default)
        );
    }

    #[test]
    fn a_config_without_control_means_the_default_socket_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bare = file(dir.path(), "bare.toml", "[[service]]\nname = \"web\"\n");
        assert_eq!(socket_of_config(&bare).unwrap(), PathBuf::from(DEFAULT_SOCKET));
        // Errors elsewhere in the file do not matter to the client.
        let odd = file(
            dir.path(),
            "odd.toml",
            "[control]\nsocket = \"/tmp/x.sock\"\n[[service]]\nname = 5\n",
        );
        assert_eq!(socket_of_config(&odd).unwrap(), PathBuf::from("/tmp/x.sock"));
        let broken = file(dir.path(), "broken.toml", "[control\n");
        let e = discover(None, Some(&broken), None, Path::new("/nonexistent")).unwrap_err();
        assert!(e.to_string().contains("broken.toml"), "{e}");
        let e = discover(None, Some(&dir.path().join("nope.toml")), None, Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("nope.toml"), "{e}");
    }
}
