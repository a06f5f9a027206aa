//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the control socket {path}: {source} (is `lb run` running? use --socket to point elsewhere)"
    )]
    Connect { path: String, source: std::io::Error },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an unreadable response: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the daemon closed the connection without answering")]
    Closed,
}

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
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
