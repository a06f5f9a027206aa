//! [`SynFlood`]: a spoofed TCP SYN generator for the SYN-flood test. One thread inside a test
//! namespace writes raw Ethernet frames on an interface through an `AF_PACKET` socket (qdisc
//! bypassed, `sendmmsg` batches), as fast as it can: SYNs to one address and port, from random
//! addresses of a test range and random ports, with random sequence numbers and Linux's SYN
//! options, and valid IPv4 and TCP checksums (updated per frame from a template).

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_common::csum::{replace2, replace4};
use nix::libc;

use crate::netns::netns_path;
use crate::packet::{ETH_LEN, Tcp, flags, syn_options};

/// Frames handed to the kernel per `sendmmsg` call.
const BATCH: usize = 64;

/// Where the flood goes and where it claims to come from.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// Namespace and interface the frames leave from.
    pub netns: String,
    pub interface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Spoofed sources: `base` + 0 .. `count` (random each frame).
    pub base: Ipv4Addr,
    pub count: u32,
    pub target: SocketAddrV4,
}

/// What a finished flood sent.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    pub frames: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    /// Frames per second.
    pub fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
}

/// A running flood; stopped (and its thread joined) by [`SynFlood::stop`] or on drop.
#[derive(Debug)]
pub struct SynFlood {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    started: Instant,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl SynFlood {
    /// Starts sending; fails if the namespace, interface or socket cannot be set up.
    pub fn start(spec: FloodSpec) -> io::Result<SynFlood> {
        let ns = File::open(netns_path(&spec.netns))?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, frames) = (stop.clone(), frames.clone());
            std::thread::spawn(move || -> io::Result<()> {
                let setup = (|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| io::Error::other(format!("setns into {}: {e}", spec.netns)))?;
                    drop(ns);
                    PacketSocket::open(&spec.interface)
                })();
                let socket = match setup {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                flood(&socket, &spec, &stop, &frames)
            })
        };
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the flood thread ended before it was ready"))??;
        Ok(SynFlood {
            stop,
            frames,
            started: Instant::now(),
            thread: Some(thread),
        })
    }

    /// Frames sent so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Stops the flood; what it sent.
    pub fn stop(mut self) -> io::Result<FloodReport> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<FloodReport> {
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| io::Error::other("the flood thread panicked"))??;
        }
        Ok(FloodReport {
            frames: self.frames(),
            elapsed,
        })
    }
}

impl Drop for SynFlood {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Sends `n` SYNs toward `spec.target`, one every `gap`, from `spec.base` + 0 .. `n` (each its own
/// source), each with its TCP checksum off by one bit: frames a backend's kernel drops as
/// invalid. Returns once all are sent.
pub fn send_bad_checksum_syns(spec: &FloodSpec, n: u32, gap: Duration) -> io::Result<()> {
    let ns = File::open(netns_path(&spec.netns))?;
    let spec = spec.clone();
    std::thread::spawn(move || -> io::Result<()> {
        use std::os::fd::AsRawFd;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns into {}: {e}", spec.netns)))?;
        let socket = PacketSocket::open(&spec.interface)?;
        for i in 0..n {
            let src = Ipv4Addr::from(u32::from(spec.base) + i);
            let mut frame = Tcp::new((src, 40000), (*spec.target.ip(), spec.target.port()), flags::SYN)
                .macs(spec.src_mac, spec.dst_mac)
                .tcp_options(&syn_options(1, 0))
                .seq(i)
                .build();
            frame[TCP_CHECK] ^= 0x01;
            // SAFETY: a plain send of a buffer we own.
            let sent = unsafe { libc::send(socket.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            std::thread::sleep(gap);
        }
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("the sending thread panicked"))?
}

/// An `AF_PACKET` raw socket bound to one interface, sending only.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn open(interface: &str) -> io::Result<PacketSocket> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let index = nix::net::if_::if_nametoindex(interface)
            .map_err(|e| io::Error::other(format!("interface {interface}: {e}")))?;
        // SAFETY: plain socket(2); protocol 0 means the socket receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields set below are the ones bind reads.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        // SAFETY: an int option. Best effort: without it frames go through the qdisc.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Ok(PacketSocket(fd))
    }
}

/// Offsets in the frame (IPv4 without options).
const IP_CHECK: usize = ETH_LEN + 10;
const IP_SRC: usize = ETH_LEN + 12;
const TCP_SPORT: usize = ETH_LEN + 20;
const TCP_SEQ: usize = ETH_LEN + 24;
const TCP_CHECK: usize = ETH_LEN + 36;

fn read4(f: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(f[at..at + 4].try_into().unwrap())
}
fn read2(f: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(f[at..at + 2].try_into().unwrap())
}

/// Sends batches until `stop`, counting the frames the kernel took.
fn flood(socket: &PacketSocket, spec: &FloodSpec, stop: &AtomicBool, frames: &AtomicU64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let template = Tcp::new(
        (spec.base, 1024),
        (*spec.target.ip(), spec.target.port()),
        flags::SYN,
    )
    .macs(spec.src_mac, spec.dst_mac)
    .tcp_options(&syn_options(1, 0))
    .seq(1)
    .build();
    let len = template.len();
    let mut buf = vec![0u8; len * BATCH];
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let base = u32::from(spec.base);
    let count = spec.count.max(1);
    while !stop.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            let f = &mut buf[i * len..(i + 1) * len];
            f.copy_from_slice(&template);
            let r = next();
            // Values as they sit in the frame (network order), read as native words like the
            // checksum helpers expect.
            let src = (base + (r as u32) % count).to_be();
            let sport = (1024 + ((r >> 32) as u16) % 64000).to_be();
            let seq = (r >> 16) as u32;
            let ip_check = replace4(read2(f, IP_CHECK), read4(f, IP_SRC), src);
            let mut tcp_check = replace4(read2(f, TCP_CHECK), read4(f, IP_SRC), src);
            tcp_check = replace2(tcp_check, read2(f, TCP_SPORT), sport);
            tcp_check = replace4(tcp_check, read4(f, TCP_SEQ), seq);
            f[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check.to_ne_bytes());
            f[IP_SRC..IP_SRC + 4].copy_from_slice(&src.to_ne_bytes());
            f[TCP_SPORT..TCP_SPORT + 2].copy_from_slice(&sport.to_ne_bytes());
            f[TCP_SEQ..TCP_SEQ + 4].copy_from_slice(&seq.to_ne_bytes());
            f[TCP_CHECK..TCP_CHECK + 2].copy_from_slice(&tcp_check.to_ne_bytes());
        }
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|i| libc::iovec {
                iov_base: buf[i * len..].as_mut_ptr().cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; each points at one iovec of `buf`.
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = std::ptr::from_mut(v);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs and the buffers they point to live across the call.
        let sent = unsafe { libc::sendmmsg(socket.0.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if sent > 0 {
            frames.fetch_add(sent as u64, Ordering::Relaxed);
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => std::thread::yield_now(),
                _ => return Err(e),
            }
        }
    }
    Ok(())
}
