//! A minimal raw AJP 1.3 client, as a web server speaks it: encode a Forward Request with chosen
//! headers and attributes (including the ones a web server must never let through, such as
//! `javax.servlet.include.*`), send its body, and read the container's answer (Send Headers, Send
//! Body Chunk, Get Body Chunk, End Response). Also the Shutdown packet.
//!
//! Deliberately independent of lb's own codec: the tests check lb against this encoder and
//! against real web servers.
//!
//! Packet layout (server → container): `12 34`, u16 length, payload. Container → server: `41 42`
//! (`AB`), u16 length, payload. Strings are a u16 length, the bytes and a NUL; `ffff` is null.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::client::connect_from;

/// Forward Request prefix code.
pub const FORWARD_REQUEST: u8 = 0x02;
/// Shutdown prefix code (server → container).
pub const SHUTDOWN: u8 = 0x07;
/// CPing prefix code.
pub const CPING: u8 = 0x0A;
/// Send Body Chunk (container → server).
pub const SEND_BODY_CHUNK: u8 = 0x03;
/// Send Headers (container → server).
pub const SEND_HEADERS: u8 = 0x04;
/// End Response (container → server).
pub const END_RESPONSE: u8 = 0x05;
/// Get Body Chunk (container → server).
pub const GET_BODY_CHUNK: u8 = 0x06;
/// CPong (container → server).
pub const CPONG: u8 = 0x09;
/// Largest payload of the default 8 KiB packet.
pub const MAX_PAYLOAD: usize = 8192 - 4;

/// A request attribute (after the headers of a Forward Request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    /// 0x01 context (unused by Tomcat, still valid).
    Context(String),
    /// 0x05 query_string.
    QueryString(String),
    /// 0x06 route (jvm_route).
    Route(String),
    /// 0x0A req_attribute: an arbitrary `name = value` request attribute.
    ReqAttribute(String, String),
    /// 0x0C secret.
    Secret(String),
}

/// A Forward Request to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRequest {
    /// Method code: 2 GET, 3 HEAD, 4 POST, …
    pub method: u8,
    pub protocol: String,
    pub uri: String,
    /// The browser's address as the web server saw it.
    pub remote_addr: String,
    pub server_name: String,
    pub server_port: u16,
    /// Headers by name (the common ones are sent coded, as web servers do, e.g. `Cookie` as
    /// `A0 09`); `Content-Length` is added for a body.
    pub headers: Vec<(String, String)>,
    pub attributes: Vec<Attr>,
    pub body: Vec<u8>,
}

/// Method code of GET.
pub const GET: u8 = 2;
/// Method code of POST.
pub const POST: u8 = 4;

impl ForwardRequest {
    /// `GET uri` from `remote_addr`, Host `lb-tests`; a `?query` part of `uri` goes into the
    /// query_string attribute, as web servers send it.
    pub fn get(uri: &str, remote_addr: &str) -> ForwardRequest {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, vec![Attr::QueryString(q.to_string())]),
            None => (uri, Vec::new()),
        };
        ForwardRequest {
            method: GET,
            protocol: "HTTP/1.1".to_string(),
            uri: path.to_string(),
            remote_addr: remote_addr.to_string(),
            server_name: "lb-tests".to_string(),
            server_port: 80,
            headers: vec![("Host".to_string(), "lb-tests".to_string())],
            attributes: query,
            body: Vec::new(),
        }
    }

    /// `POST uri` with `body`.
    pub fn post(uri: &str, remote_addr: &str, body: &[u8]) -> ForwardRequest {
        ForwardRequest {
            method: POST,
            body: body.to_vec(),
            ..ForwardRequest::get(uri, remote_addr)
        }
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> ForwardRequest {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Add an attribute.
    pub fn attr(mut self, a: Attr) -> ForwardRequest {
        self.attributes.push(a);
        self
    }

    /// The Forward Request packet (without the body chunks).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = vec![FORWARD_REQUEST, self.method];
        put_str(&mut p, &self.protocol);
        put_str(&mut p, &self.uri);
        put_str(&mut p, &self.remote_addr);
        put_null(&mut p); // remote_host
        put_str(&mut p, &self.server_name);
        put_u16(&mut p, self.server_port);
        p.push(0); // is_ssl
        let mut headers = self.headers.clone();
        if !self.body.is_empty()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            headers.push(("Content-Length".to_string(), self.body.len().to_string()));
        }
        put_u16(&mut p, headers.len() as u16);
        for (k, v) in &headers {
            match header_code(k) {
                Some(code) => put_u16(&mut p, code),
                None => put_str(&mut p, k),
            }
            put_str(&mut p, v);
        }
        for a in &self.attributes {
            match a {
                Attr::Context(v) => attr(&mut p, 0x01, v),
                Attr::QueryString(v) => attr(&mut p, 0x05, v),
                Attr::Route(v) => attr(&mut p, 0x06, v),
                Attr::Secret(v) => attr(&mut p, 0x0C, v),
                Attr::ReqAttribute(k, v) => {
                    p.push(0x0A);
                    put_str(&mut p, k);
                    put_str(&mut p, v);
                }
            }
        }
        p.push(0xFF);
        frame(&p)
    }
}

fn attr(p: &mut Vec<u8>, code: u8, v: &str) {
    p.push(code);
    put_str(p, v);
}

/// The coded request header names (`A0 01` … `A0 0E`).
fn header_code(name: &str) -> Option<u16> {
    const NAMES: [&str; 14] = [
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "authorization",
        "connection",
        "content-type",
        "content-length",
        "cookie",
        "cookie2",
        "host",
        "pragma",
        "referer",
        "user-agent",
    ];
    let lower = name.to_ascii_lowercase();
    NAMES.iter().position(|n| *n == lower).map(|i| 0xA001 + i as u16)
}

/// The coded response header names (`A0 01` … `A0 0B`).
fn response_header_name(code: u16) -> Option<&'static str> {
    const NAMES: [&str; 11] = [
        "Content-Type",
        "Content-Language",
        "Content-Length",
        "Date",
        "Last-Modified",
        "Location",
        "Set-Cookie",
        "Set-Cookie2",
        "Servlet-Engine",
        "Status",
        "WWW-Authenticate",
    ];
    code.checked_sub(0xA001)
        .and_then(|i| NAMES.get(i as usize).copied())
}

fn put_u16(p: &mut Vec<u8>, v: u16) {
    p.extend_from_slice(&v.to_be_bytes());
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    put_u16(p, s.len() as u16);
    p.extend_from_slice(s.as_bytes());
    p.push(0);
}

fn put_null(p: &mut Vec<u8>) {
    put_u16(p, 0xFFFF);
}

/// `12 34 LEN payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x12, 0x34];
    put_u16(&mut v, payload.len() as u16);
    v.extend_from_slice(payload);
    v
}

/// A body chunk packet: `12 34 LEN+2 LEN data` (an empty one ends the body).
pub fn body_chunk(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return vec![0x12, 0x34, 0, 0];
    }
    let mut p = Vec::with_capacity(data.len() + 2);
    put_u16(&mut p, data.len() as u16);
    p.extend_from_slice(data);
    frame(&p)
}

/// The Shutdown packet (`12 34 00 01 07`).
pub fn shutdown_packet() -> Vec<u8> {
    frame(&[SHUTDOWN])
}

/// The CPing packet (`12 34 00 01 0A`).
pub fn cping_packet() -> Vec<u8> {
    frame(&[CPING])
}

/// The container's answer to one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AjpResponse {
    pub status: u16,
    pub message: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// End Response's reuse flag.
    pub reuse: bool,
}

impl AjpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A cursor over a packet payload; every read is checked.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.at + n > self.b.len() {
            return Err(bad(format!(
                "packet too short: need {n} bytes at {} of {}",
                self.at,
                self.b.len()
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> io::Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn string(&mut self) -> io::Result<String> {
        let len = self.u16()?;
        if len == 0xFFFF {
            return Ok(String::new());
        }
        let s = String::from_utf8_lossy(self.take(len as usize)?).into_owned();
        self.take(1)?; // NUL
        Ok(s)
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Read one container → server packet (`AB LEN payload`); its payload.
pub fn read_packet(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[..2] != *b"AB" {
        return Err(bad(format!("not a container packet: {head:02x?}")));
    }
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok(payload)
}

/// Send `req` (and its body in chunks of at most [`MAX_PAYLOAD`] − 2 bytes, answering Get Body
/// Chunk) on `stream` and read the answer up to End Response. An EOF before End Response is an
/// `UnexpectedEof` error whose message says how far the answer got.
pub fn exchange(stream: &mut TcpStream, req: &ForwardRequest) -> io::Result<AjpResponse> {
    let mut out = req.encode();
    let chunk = MAX_PAYLOAD - 2;
    // The first chunk goes right after the Forward Request; the rest when Tomcat asks for it.
    let mut sent = req.body.len().min(chunk);
    if sent > 0 {
        out.extend_from_slice(&body_chunk(&req.body[..sent]));
    }
    stream.write_all(&out)?;
    let mut resp = AjpResponse::default();
    let mut got_headers = false;
    loop {
        let p = match read_packet(stream) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before End Response ({})",
                        if got_headers {
                            format!("after status {}", resp.status)
                        } else {
                            "no Send Headers yet".to_string()
                        }
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        let mut c = Cur { b: &p, at: 0 };
        match c.u8()? {
            SEND_HEADERS => {
                resp.status = c.u16()?;
                resp.message = c.string()?;
                let n = c.u16()?;
                for _ in 0..n {
                    let peek = c.u16()?;
                    let name = if peek >= 0xA000 {
                        response_header_name(peek).map_or_else(|| format!("x-coded-{peek:04x}"), String::from)
                    } else {
                        c.at -= 2;
                        c.string()?
                    };
                    let value = c.string()?;
                    resp.headers.push((name, value));
                }
                got_headers = true;
            }
            SEND_BODY_CHUNK => {
                let len = c.u16()? as usize;
                resp.body.extend_from_slice(c.take(len)?);
            }
            GET_BODY_CHUNK => {
                // An empty chunk once the body is all sent.
                let want = (c.u16()? as usize).clamp(1, chunk);
                let n = (req.body.len() - sent).min(want);
                stream.write_all(&body_chunk(&req.body[sent..sent + n]))?;
                sent += n;
            }
            END_RESPONSE => {
                resp.reuse = c.u8().is_ok_and(|b| b != 0);
                if !got_headers {
                    return Err(bad("End Response without Send Headers".to_string()));
                }
                return Ok(resp);
            }
            CPONG => return Err(bad("CPong in answer to a Forward Request".to_string())),
            other => return Err(bad(format!("unexpected container packet type {other:#04x}"))),
        }
    }
}

/// Connect from `src` in namespace `ns` to `addr` (bounded by `timeout`, as are reads and writes)
/// and do one [`exchange`].
pub fn exchange_from(
    ns: &str,
    src: Ipv4Addr,
    addr: SocketAddr,
    req: &ForwardRequest,
    timeout: Duration,
) -> io::Result<AjpResponse> {
    let mut s = connect_from(ns, src, addr, timeout)?;
    exchange(&mut s, req)
}

/// Write `packet` and wait up to the stream's read timeout for an answer: the first packet's
/// payload, or `None` when the peer closed the connection without one.
pub fn send_and_read(stream: &mut TcpStream, packet: &[u8]) -> io::Result<Option<Vec<u8>>> {
    stream.write_all(packet)?;
    match read_packet(stream) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_request_layout() {
        let req = ForwardRequest::get("/x", "10.0.0.9")
            .header("Cookie", "JSESSIONID=a.t1")
            .attr(Attr::Secret("s".into()));
        let p = req.encode();
        assert_eq!(&p[..2], &[0x12, 0x34]);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len() - 4);
        assert_eq!(p[4], FORWARD_REQUEST);
        assert_eq!(p[5], GET);
        // protocol "HTTP/1.1"
        assert_eq!(&p[6..8], &[0, 8]);
        assert_eq!(&p[8..16], b"HTTP/1.1");
        assert_eq!(p[16], 0);
        // The coded cookie header and the secret attribute are there, and the terminator last.
        let cookie = [0xA0, 0x09, 0x00, 15];
        assert!(p.windows(4).any(|w| w == cookie), "{p:02x?}");
        let secret = [0x0C, 0x00, 0x01, b's', 0x00, 0xFF];
        assert!(p.ends_with(&secret), "{p:02x?}");
    }

    #[test]
    fn body_chunks_and_control_packets() {
        assert_eq!(body_chunk(&[]), vec![0x12, 0x34, 0, 0]);
        assert_eq!(body_chunk(b"ab"), vec![0x12, 0x34, 0, 4, 0, 2, b'a', b'b']);
        assert_eq!(shutdown_packet(), vec![0x12, 0x34, 0, 1, 7]);
        assert_eq!(cping_packet(), crate::AJP_CPING.to_vec());
    }

    #[test]
    fn reads_a_container_answer() {
        // Send Headers 200 "OK" with Set-Cookie (coded), one body chunk, End Response reuse.
        let mut wire = Vec::new();
        let mut h = vec![SEND_HEADERS, 0, 200];
        put_str(&mut h, "OK");
        put_u16(&mut h, 1);
        put_u16(&mut h, 0xA007);
        put_str(&mut h, "JSESSIONID=x.t2");
        for p in [
            h,
            vec![SEND_BODY_CHUNK, 0, 2, b'h', b'i', 0],
            vec![END_RESPONSE, 1],
        ] {
            wire.extend_from_slice(b"AB");
            put_u16(&mut wire, p.len() as u16);
            wire.extend_from_slice(&p);
        }
        let mut r = &wire[..];
        let h = read_packet(&mut r).unwrap();
        assert_eq!(h[0], SEND_HEADERS);
        assert_eq!(read_packet(&mut r).unwrap()[0], SEND_BODY_CHUNK);
        assert_eq!(read_packet(&mut r).unwrap(), vec![END_RESPONSE, 1]);
        assert!(read_packet(&mut r).is_err());
    }
}
