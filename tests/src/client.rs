//! Client-side helpers: TCP connections from a chosen source address inside a namespace, a tiny
//! HTTP/1.1 client and an AJP CPing probe.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};

use crate::netns::in_netns;
use crate::{AJP_CPING, AJP_CPONG};

/// Connect and I/O timeout used by the convenience helpers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("only IPv4 is supported, got {a}"),
        )),
    }
}

/// Open a TCP connection from `src` (port chosen by the kernel; `Ipv4Addr::UNSPECIFIED` for any)
/// to `dst`, inside namespace `ns`. Connect is bounded by `timeout`; the returned stream has read
/// and write timeouts of `timeout` too (change them with `set_read_timeout` & co).
pub fn connect_from(ns: &str, src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let dst = v4(dst)?;
    in_netns(ns, move || -> io::Result<TcpStream> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("bind {src}: {e}")))?;
        let stream = TcpStream::from(fd);
        // SO_SNDTIMEO also bounds a blocking connect() (it then fails with EINPROGRESS).
        stream.set_write_timeout(Some(timeout))?;
        match connect(stream.as_raw_fd(), &SockaddrIn::from(dst)) {
            Ok(()) => {}
            Err(Errno::EINPROGRESS) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect {src} -> {dst} in {ns}: timed out after {timeout:?}"),
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("connect {src} -> {dst} in {ns}: {e}"),
                ));
            }
        }
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })?
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Headers in order received (names as sent).
    pub headers: Vec<(String, String)>,
    /// The body as text (lossy UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 client connection that can carry several requests (keep-alive).
#[derive(Debug)]
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    host: String,
}

impl HttpConn {
    /// Connect from `src` inside `ns` to `addr` (see [`connect_from`], [`DEFAULT_TIMEOUT`]).
    pub fn connect_from(ns: &str, src: Ipv4Addr, addr: SocketAddr) -> io::Result<HttpConn> {
        let stream = connect_from(ns, src, addr, DEFAULT_TIMEOUT)?;
        Ok(HttpConn::new(stream, &addr.to_string()))
    }

    /// Wrap an existing connection; `host` goes in the `Host:` header.
    pub fn new(stream: TcpStream, host: &str) -> HttpConn {
        HttpConn {
            reader: BufReader::new(stream),
            host: host.to_string(),
        }
    }

    /// The underlying stream (for addresses, timeouts, shutdown).
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// `GET path` keeping the connection open for further requests.
    pub fn get(&mut self, path: &str) -> io::Result<HttpResponse> {
        self.request(path, false)
    }

    /// `GET path` with `Connection: close`; the server closes afterwards.
    pub fn get_close(&mut self, path: &str) -> io::Result<HttpResponse> {
        self.request(path, true)
    }

    fn request(&mut self, path: &str, close: bool) -> io::Result<HttpResponse> {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-tests\r\nConnection: {}\r\n\r\n",
            self.host,
            if close { "close" } else { "keep-alive" }
        );
        self.reader.get_mut().write_all(req.as_bytes())?;
        read_response(&mut self.reader)
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<HttpResponse> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before an HTTP response",
        ));
    }
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1.x status line: {:?}", line.trim_end())));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {:?}", line.trim_end())))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside HTTP headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = HttpResponse {
        status,
        headers,
        body: String::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return Err(bad("chunked responses are not supported".to_string()));
    }
    let mut body = Vec::new();
    match resp.header("content-length") {
        Some(len) => {
            let len: u64 = len
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
            Read::take(&mut *reader, len).read_to_end(&mut body)?;
            if (body.len() as u64) < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body cut short: {} of {len} bytes", body.len()),
                ));
            }
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(resp)
}

/// One `GET path` on a fresh connection from `src` inside `ns` to `addr` (`Connection: close`).
pub fn http_request_from(ns: &str, src: Ipv4Addr, addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    HttpConn::connect_from(ns, src, addr)?.get_close(path)
}

/// Like [`http_request_from`], returning the body; a status other than 200 is an error.
/// Against `lb-testsrv http` the body is the backend's name and a newline (`"b1\n"`).
pub fn http_get_from(ns: &str, src: Ipv4Addr, addr: SocketAddr, path: &str) -> io::Result<String> {
    let resp = http_request_from(ns, src, addr, path)?;
    if resp.status != 200 {
        return Err(io::Error::other(format!(
            "GET http://{addr}{path} from {src}: status {} body {:?}",
            resp.status, resp.body
        )));
    }
    Ok(resp.body)
}

/// Send an AJP CPing on `stream` and read the answer: up to 5 bytes, stopping early at EOF.
///
/// - `Ok(bytes)`: what arrived before 5 bytes or EOF ([`AJP_CPONG`] from a healthy container;
///   fewer bytes when the peer closed early).
/// - `Err(kind TimedOut)`: nothing complete within `timeout` (the message says how many bytes came).
/// - other `Err`: e.g. `ConnectionReset` when the peer reset the connection.
pub fn ajp_cping(stream: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&AJP_CPING)?;
    let mut got = Vec::with_capacity(AJP_CPONG.len());
    let mut buf = [0u8; 5];
    while got.len() < AJP_CPONG.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no CPong within {timeout:?} (got {got:02x?})"),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[..AJP_CPONG.len() - got.len()]) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no CPong within {timeout:?} (got {got:02x?})"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Connect from `src` inside `ns` to `addr` and do one [`ajp_cping`] (connect also bounded by
/// `timeout`).
pub fn ajp_cping_from(ns: &str, src: Ipv4Addr, addr: SocketAddr, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut s = connect_from(ns, src, addr, timeout)?;
    ajp_cping(&mut s, timeout)
}
