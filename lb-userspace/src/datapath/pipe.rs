//! `splice = "pipe"`: one direction of a proxied connection relayed with splice(2), socket → pipe →
//! socket, so the payload never enters user space (HAProxy's kernel splicing).
//!
//! Each direction owns a non-blocking pipe. A round moves what the source has (at most a pipe's
//! worth) into the pipe, then all of it out to the destination before the next round, so the pipe
//! is empty whenever the source is read: an `EAGAIN` from the socket → pipe splice means the
//! socket has nothing, one from pipe → socket means the destination's send buffer is full. That is
//! the backpressure: a slow reader stops the rounds, and the source's receive window closes. The
//! source's EOF is passed on as a half-close (`shutdown(SHUT_WR)`) once the pipe is empty.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe holds (F_SETPIPE_SZ; the kernel rounds up to pages).
const PIPE_SIZE: usize = 256 * 1024;

/// A pipe pair, read end and write end, both non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What one splice into it may move.
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors this function now owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per round; without the right (pipe-max-size) the default stays.
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        let size = if got > 0 { got as usize } else { 64 * 1024 };
        Ok(Pipe { read, write, size })
    }
}

/// splice(2) of at most `len` bytes from `from` to `to`, neither blocking.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from.as_fd().as_raw_fd(),
            std::ptr::null_mut(),
            to.as_fd().as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Relays `src` to `dst` until `src` reaches EOF, then half-closes `dst`. Counts bytes moved.
pub async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    activity: &super::proxy::Activity,
) -> io::Result<()> {
    let pipe = Pipe::new()?;
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || splice(src, &pipe.write, pipe.size)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        activity.moved();
        if n == 0 {
            // Pass the half-close on: the peer sees EOF but may still send.
            return nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write).or_else(
                |e| {
                    if e == nix::errno::Errno::ENOTCONN {
                        Ok(())
                    } else {
                        Err(e.into())
                    }
                },
            );
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice(&pipe.read, dst, left)) {
                Ok(m) => {
                    left -= m;
                    activity.moved();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
