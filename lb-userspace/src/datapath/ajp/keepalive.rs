//! TCP keepalive on the AJP datapath's sockets (web tier and backends), so a peer that vanished
//! without a FIN (power loss, a dropped route) is noticed by a failing read instead of never
//! (mod_jk's `socket_keepalive`, with probes much sooner than the kernel's two-hour default).

use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};

/// Idle time before the first probe.
pub const IDLE: Duration = Duration::from_secs(60);
/// Time between unanswered probes.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection fails (ETIMEDOUT): a vanished peer is noticed after
/// `IDLE + COUNT * INTERVAL`, two minutes.
pub const COUNT: u32 = 6;

/// Why keepalive could not be turned on.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    #[error("setting {0} failed: {1}")]
    Option(&'static str, nix::Error),
}

/// Turns keepalive on for `socket`, with [`IDLE`], [`INTERVAL`] and [`COUNT`].
pub fn enable(socket: &impl AsFd) -> Result<(), KeepaliveError> {
    let fd = socket.as_fd();
    setsockopt(&fd, sockopt::KeepAlive, &true).map_err(|e| KeepaliveError::Option("SO_KEEPALIVE", e))?;
    setsockopt(&fd, sockopt::TcpKeepIdle, &(IDLE.as_secs() as u32))
        .map_err(|e| KeepaliveError::Option("TCP_KEEPIDLE", e))?;
    setsockopt(&fd, sockopt::TcpKeepInterval, &(INTERVAL.as_secs() as u32))
        .map_err(|e| KeepaliveError::Option("TCP_KEEPINTVL", e))?;
    setsockopt(&fd, sockopt::TcpKeepCount, &COUNT).map_err(|e| KeepaliveError::Option("TCP_KEEPCNT", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::{getsockopt, sockopt};

    use super::*;

    #[tokio::test]
    async fn sets_keepalive_and_its_timers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        assert!(!getsockopt(&s, sockopt::KeepAlive).unwrap(), "off by default");
        enable(&s).unwrap();
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&s, sockopt::TcpKeepIdle).unwrap(), 60);
        assert_eq!(getsockopt(&s, sockopt::TcpKeepInterval).unwrap(), 10);
        assert_eq!(getsockopt(&s, sockopt::TcpKeepCount).unwrap(), COUNT);
    }
}
