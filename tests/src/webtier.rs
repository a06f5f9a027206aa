//! [`WebTier`]: a "web server" namespace hung off the lb namespace of a [`Topology`], and
//! [`Browser`], an HTTP/1.1 client with a session cookie that talks to the web server from one of
//! the client addresses.
//!
//! ```text
//!  <prefix>-c  10.0.0.10..  ── (routed by <prefix>-lb) ──>  <prefix>-w  eth0 10.2.0.2/24
//!                                                            default via 10.2.0.1
//!  <prefix>-lb  to-w 10.2.0.1/24, VIP 10.0.0.100  <── the web server's AJP connections
//! ```
//!
//! The client reaches the web server through the lb namespace (plain kernel forwarding), so the
//! web server sees each browser's own address; its AJP connections go to the VIP, a local address
//! of the lb namespace. Drop the web server's process before the `WebTier`.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::client::connect_from;
use crate::netns::Netns;
use crate::topology::Topology;

/// The web namespace's address.
pub const WEB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
/// The lb namespace's address on the web link (the web namespace's gateway).
pub const WEB_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
/// Interface in the lb namespace facing the web namespace.
pub const LB_WEB_IF: &str = "to-w";

/// The web namespace `<prefix>-w`, wired to the lb namespace; deleted on drop.
#[derive(Debug)]
pub struct WebTier {
    ns: Netns,
}

impl WebTier {
    /// Create `<prefix>-w` with `eth0` 10.2.0.2/24 linked to `to-w` 10.2.0.1/24 in the lb namespace.
    pub fn attach(topo: &Topology) -> io::Result<WebTier> {
        let ns = Netns::new(&format!("{}-w", topo.prefix()))?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let _ = ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        let _ = ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        topo.lb_ns().ip_batch(&[
            format!(
                "link add {LB_WEB_IF} type veth peer name {} netns {}",
                topo.peer_if(),
                ns.name()
            ),
            format!("addr add {WEB_GATEWAY}/24 dev {LB_WEB_IF}"),
            format!("link set {LB_WEB_IF} up"),
        ])?;
        ns.ip_batch(&[
            format!("addr add {WEB_ADDR}/24 dev {}", topo.peer_if()),
            format!("link set {} up", topo.peer_if()),
            format!("route add default via {WEB_GATEWAY}"),
        ])?;
        Ok(WebTier { ns })
    }

    /// The web namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The web server's address (10.2.0.2).
    pub fn addr(&self) -> Ipv4Addr {
        WEB_ADDR
    }
}

/// One HTTP response of the test webapp (`tomcat::INDEX_JSP`), with its `key=value` lines parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Page {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of the body line `key=…`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }

    /// All `key=value` lines of the body.
    pub fn fields(&self) -> BTreeMap<String, String> {
        self.body
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The Tomcat that answered (`route=`), or "" when the body has none.
    pub fn route(&self) -> &str {
        self.field("route").unwrap_or("")
    }
}

/// A browser: one source address in the client namespace and a `JSESSIONID` cookie jar. Every
/// request is a new connection (`Connection: close`), as simple as it gets and independent of the
/// web server's keep-alive.
#[derive(Clone, Debug)]
pub struct Browser {
    ns: String,
    src: Ipv4Addr,
    server: SocketAddr,
    /// The `JSESSIONID` cookie value, once the server set one.
    pub session: Option<String>,
    /// Connect and I/O timeout of each request.
    pub timeout: Duration,
}

impl Browser {
    /// A browser in namespace `ns` at `src` talking to `server`, without a cookie yet.
    pub fn new(ns: &str, src: Ipv4Addr, server: SocketAddr) -> Browser {
        Browser {
            ns: ns.to_string(),
            src,
            server,
            session: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// The browser's source address.
    pub fn addr(&self) -> Ipv4Addr {
        self.src
    }

    /// The route suffix of the session cookie (`….t2` → `t2`).
    pub fn cookie_route(&self) -> Option<&str> {
        self.session.as_deref()?.rsplit_once('.').map(|(_, r)| r)
    }

    /// The same browser state (cookie) moved to another source address.
    pub fn moved_to(&self, src: Ipv4Addr) -> Browser {
        Browser { src, ..self.clone() }
    }

    /// `GET path`, sending and then updating the session cookie.
    pub fn get(&mut self, path: &str) -> io::Result<Page> {
        self.request("GET", path, None, false)
    }

    /// `POST path` with `body` (`application/octet-stream`), sending and updating the cookie.
    pub fn post(&mut self, path: &str, body: &[u8]) -> io::Result<Page> {
        self.request("POST", path, Some(body), false)
    }

    /// A POST whose body goes `Transfer-Encoding: chunked` (no length announced), in chunks of
    /// up to 5,000 bytes.
    pub fn post_chunked(&mut self, path: &str, body: &[u8]) -> io::Result<Page> {
        self.request("POST", path, Some(body), true)
    }

    fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>, chunked: bool) -> io::Result<Page> {
        let mut stream = connect_from(&self.ns, self.src, self.server, self.timeout)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-tests\r\nConnection: close\r\n",
            self.server
        );
        if let Some(s) = &self.session {
            head.push_str(&format!("Cookie: JSESSIONID={s}\r\n"));
        }
        if let Some(b) = body {
            head.push_str("Content-Type: application/octet-stream\r\n");
            if chunked {
                head.push_str("Transfer-Encoding: chunked\r\n");
            } else {
                head.push_str(&format!("Content-Length: {}\r\n", b.len()));
            }
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        match body {
            Some(b) if chunked => {
                for part in b.chunks(5000) {
                    out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Some(b) => out.extend_from_slice(b),
            None => {}
        }
        stream.write_all(&out)?;
        let page = read_page(&mut BufReader::new(stream))?;
        if let Some(c) = page.header("set-cookie")
            && let Some(v) = c
                .split(';')
                .next()
                .and_then(|kv| kv.trim().strip_prefix("JSESSIONID="))
        {
            self.session = Some(v.to_string());
        }
        Ok(page)
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_line(r: &mut impl BufRead, what: &str) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed {what}"),
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Read one HTTP/1.1 response: status line, headers, then a body by Content-Length, chunked, or
/// up to EOF.
pub fn read_page(r: &mut impl BufRead) -> io::Result<Page> {
    let status_line = read_line(r, "before an HTTP response")?;
    let mut parts = status_line.split_whitespace();
    if !parts.next().unwrap_or("").starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1.x status line: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let l = read_line(r, "inside HTTP headers")?;
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut page = Page {
        status,
        headers,
        body: String::new(),
    };
    let mut body = Vec::new();
    if page
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let size_line = read_line(r, "inside a chunked body")?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size line {size_line:?}")))?;
            if size == 0 {
                // Trailers up to the empty line.
                while !read_line(r, "inside chunk trailers")?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r, "after a chunk")?;
        }
    } else if let Some(len) = page.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    page.body = String::from_utf8_lossy(&body).into_owned();
    Ok(page)
}
