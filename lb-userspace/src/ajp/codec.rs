//! AJP 1.3 packets on `bytes`: streaming framing and every message of both directions.
//!
//! A packet is a 4-byte header (magic, payload length) and a payload. The web server sends
//! `12 34 | len | payload` to the container, the container answers `41 42 ("AB") | len | payload`.
//! [`FrameDecoder`] cuts whole packets out of a read buffer without copying them ([`Frame`] shares
//! the buffer's memory); [`ServerMessage`] and [`ContainerMessage`] decode and encode payloads.
//! Request body packets have no type byte, so whether a `12 34` packet is body data or a typed
//! message depends on where the request stands: the caller says which it expects.
//!
//! Decoding never panics and never allocates more than the packet it reads: every length is
//! checked against what is left of the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Magic of packets from the web server to the container.
pub const SERVER_MAGIC: [u8; 2] = [0x12, 0x34];
/// Magic of packets from the container to the web server ("AB").
pub const CONTAINER_MAGIC: [u8; 2] = [0x41, 0x42];
/// Bytes of magic and length before the payload.
pub const HEADER_LEN: usize = 4;
/// Default largest packet, header included (Tomcat's and mod_jk's default `packetSize`).
pub const DEFAULT_MAX_PACKET: usize = 8192;
/// Smallest allowed maximum packet size.
pub const MIN_MAX_PACKET: usize = 1024;
/// Largest allowed maximum packet size (Tomcat's upper bound for `packetSize`).
pub const MAX_MAX_PACKET: usize = 65536;
/// A string length of 0xFFFF marks a null string.
const NULL_STRING: u16 = 0xFFFF;

/// Payload type bytes.
pub mod kind {
    pub const FORWARD_REQUEST: u8 = 2;
    pub const SEND_BODY_CHUNK: u8 = 3;
    pub const SEND_HEADERS: u8 = 4;
    pub const END_RESPONSE: u8 = 5;
    pub const GET_BODY_CHUNK: u8 = 6;
    pub const SHUTDOWN: u8 = 7;
    pub const PING: u8 = 8;
    pub const CPONG: u8 = 9;
    pub const CPING: u8 = 10;
}

/// Request attribute codes of the Forward Request.
pub mod attr {
    pub const CONTEXT: u8 = 0x01;
    pub const SERVLET_PATH: u8 = 0x02;
    pub const REMOTE_USER: u8 = 0x03;
    pub const AUTH_TYPE: u8 = 0x04;
    pub const QUERY_STRING: u8 = 0x05;
    pub const ROUTE: u8 = 0x06;
    pub const SSL_CERT: u8 = 0x07;
    pub const SSL_CIPHER: u8 = 0x08;
    pub const SSL_SESSION: u8 = 0x09;
    pub const REQ_ATTRIBUTE: u8 = 0x0A;
    pub const SSL_KEY_SIZE: u8 = 0x0B;
    pub const SECRET: u8 = 0x0C;
    pub const STORED_METHOD: u8 = 0x0D;
    pub const ARE_DONE: u8 = 0xFF;
}

/// Coded request header names (0xA0xx).
pub mod req_header {
    pub const ACCEPT: u16 = 0xA001;
    pub const AUTHORIZATION: u16 = 0xA005;
    pub const CONTENT_TYPE: u16 = 0xA007;
    pub const CONTENT_LENGTH: u16 = 0xA008;
    pub const COOKIE: u16 = 0xA009;
    pub const COOKIE2: u16 = 0xA00A;
    pub const HOST: u16 = 0xA00B;
    pub const USER_AGENT: u16 = 0xA00E;
}

/// Coded response header names (0xA0xx).
pub mod res_header {
    pub const CONTENT_TYPE: u16 = 0xA001;
    pub const CONTENT_LENGTH: u16 = 0xA003;
    pub const SET_COOKIE: u16 = 0xA007;
}

/// Which side sent a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Web server → container (`12 34`).
    ToContainer,
    /// Container → web server (`AB`).
    ToServer,
}

impl Direction {
    pub fn magic(self) -> [u8; 2] {
        match self {
            Direction::ToContainer => SERVER_MAGIC,
            Direction::ToServer => CONTAINER_MAGIC,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("bad packet magic {got:02x?} (expected {expected:02x?})")]
    BadMagic { got: [u8; 2], expected: [u8; 2] },
    #[error("packet of {len} bytes is larger than the maximum packet size {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty packet where a message was expected")]
    Empty,
    #[error("packet type {0:#04x} is not allowed here")]
    UnexpectedType(u8),
    #[error("packet ends inside {0}")]
    Truncated(&'static str),
    #[error("{0} extra bytes after the end of the message")]
    Trailing(usize),
    #[error("unknown Forward Request attribute code {0:#04x}")]
    UnknownAttribute(u8),
    #[error("header name must not be a null string")]
    NullHeaderName,
    #[error("string of {0} bytes is too long to encode")]
    StringTooLong(usize),
    #[error("more than {MAX_ITEMS} {0} in one message")]
    TooMany(&'static str),
}

/// Most headers, and apart most attributes, one message may carry: ten times the limit httpd
/// (`LimitRequestFields`) and Tomcat (`maxHeaderCount`) keep by default, so nothing they pass is
/// refused, while a packet of tiny headers (four bytes each) cannot make lb hold a parsed request
/// many times the packet's size.
pub const MAX_ITEMS: usize = 1000;

/// One whole packet, header included, sharing memory with the buffer it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// Header and payload as read (to relay the packet unchanged).
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    pub fn payload(&self) -> Bytes {
        self.bytes.slice(HEADER_LEN..)
    }

    /// The first payload byte (the message type, except for request body packets).
    pub fn kind(&self) -> Option<u8> {
        self.bytes.get(HEADER_LEN).copied()
    }

    /// Packet length, header included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() == HEADER_LEN
    }
}

/// Cuts whole packets of one direction out of a read buffer.
#[derive(Clone, Copy, Debug)]
pub struct FrameDecoder {
    magic: [u8; 2],
    max: usize,
}

impl FrameDecoder {
    /// `max` is the largest packet accepted, header included (clamped to 1024..=65536).
    pub fn new(direction: Direction, max: usize) -> Self {
        FrameDecoder {
            magic: direction.magic(),
            max: max.clamp(MIN_MAX_PACKET, MAX_MAX_PACKET),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The next whole packet, `None` if `buf` does not hold one yet (read more), or an error as
    /// soon as the bytes present cannot start a valid packet.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if buf.len() >= 2 && buf[..2] != self.magic {
            return Err(CodecError::BadMagic {
                got: [buf[0], buf[1]],
                expected: self.magic,
            });
        }
        if buf.len() < HEADER_LEN {
            if buf.len() == 1 && buf[0] != self.magic[0] {
                return Err(CodecError::BadMagic {
                    got: [buf[0], 0],
                    expected: self.magic,
                });
            }
            return Ok(None);
        }
        let len = HEADER_LEN + usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len > self.max {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        Ok(Some(Frame {
            bytes: buf.split_to(len).freeze(),
        }))
    }
}

/// Writes a packet header and returns the offset of the length field (patched by [`finish`]).
fn start(out: &mut BytesMut, direction: Direction) -> usize {
    out.put_slice(&direction.magic());
    let at = out.len();
    out.put_u16(0);
    at
}

/// Patches the payload length of the packet started at `at`; fails if it exceeds `max`.
fn finish(out: &mut BytesMut, at: usize, max: usize) -> Result<(), CodecError> {
    let total = out.len() - at + 2;
    let payload = out.len() - at - 2;
    if total > max.min(MAX_MAX_PACKET) || payload > usize::from(u16::MAX) {
        out.truncate(at - 2);
        return Err(CodecError::TooLarge { len: total, max });
    }
    out[at..at + 2].copy_from_slice(&(payload as u16).to_be_bytes());
    Ok(())
}

/// An AJP string: `None` is the null string (length 0xFFFF).
pub type AjpString = Option<Bytes>;

fn put_string(out: &mut BytesMut, s: &AjpString) -> Result<(), CodecError> {
    match s {
        None => out.put_u16(NULL_STRING),
        Some(b) => {
            if b.len() >= usize::from(NULL_STRING) {
                return Err(CodecError::StringTooLong(b.len()));
            }
            out.put_u16(b.len() as u16);
            out.put_slice(b);
            out.put_u8(0);
        }
    }
    Ok(())
}

/// Reads fields off a payload; every read checks the length first.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        if self.buf.is_empty() {
            return Err(CodecError::Truncated(what));
        }
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        if self.buf.len() < 2 {
            return Err(CodecError::Truncated(what));
        }
        Ok(self.buf.get_u16())
    }

    fn peek_u16(&self) -> Option<u16> {
        (self.buf.len() >= 2).then(|| u16::from_be_bytes([self.buf[0], self.buf[1]]))
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated(what));
        }
        Ok(self.buf.split_to(n))
    }

    /// A string: length, bytes, and the terminating NUL (whose value is not checked).
    fn string(&mut self, what: &'static str) -> Result<AjpString, CodecError> {
        let len = self.u16(what)?;
        if len == NULL_STRING {
            return Ok(None);
        }
        let s = self.bytes(usize::from(len), what)?;
        self.u8(what)?;
        Ok(Some(s))
    }

    fn end(&self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

/// A header name: one of the coded common names (0xA0xx) or a string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderName {
    Coded(u16),
    /// Shorter than 0xA000 bytes (longer lengths would read as codes).
    Named(Bytes),
}

impl HeaderName {
    fn read(r: &mut Reader) -> Result<HeaderName, CodecError> {
        match r.peek_u16() {
            Some(code) if code >> 8 == 0xA0 => {
                r.u16("header name")?;
                Ok(HeaderName::Coded(code))
            }
            _ => r
                .string("header name")?
                .map(HeaderName::Named)
                .ok_or(CodecError::NullHeaderName),
        }
    }

    fn write(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        match self {
            HeaderName::Coded(code) => out.put_u16(*code),
            HeaderName::Named(name) => {
                if name.len() >= 0xA000 {
                    return Err(CodecError::StringTooLong(name.len()));
                }
                put_string(out, &Some(name.clone()))?;
            }
        }
        Ok(())
    }

    /// Whether this is the request header `code`, coded or spelled as `name` (ASCII case ignored).
    pub fn is(&self, code: u16, name: &str) -> bool {
        match self {
            HeaderName::Coded(c) => *c == code,
            HeaderName::Named(n) => n.eq_ignore_ascii_case(name.as_bytes()),
        }
    }
}

/// A header: name and value.
pub type Header = (HeaderName, AjpString);

fn read_headers(r: &mut Reader) -> Result<Vec<Header>, CodecError> {
    let n = r.u16("header count")?;
    if usize::from(n) > MAX_ITEMS {
        return Err(CodecError::TooMany("headers"));
    }
    // Each header takes at least 4 bytes: never reserve more than the payload could hold.
    let mut headers = Vec::with_capacity(usize::from(n).min(r.buf.len() / 4));
    for _ in 0..n {
        let name = HeaderName::read(r)?;
        let value = r.string("header value")?;
        headers.push((name, value));
    }
    Ok(headers)
}

fn write_headers(out: &mut BytesMut, headers: &[Header]) -> Result<(), CodecError> {
    let n = u16::try_from(headers.len()).map_err(|_| CodecError::TooLarge {
        len: headers.len(),
        max: usize::from(u16::MAX),
    })?;
    out.put_u16(n);
    for (name, value) in headers {
        name.write(out)?;
        put_string(out, value)?;
    }
    Ok(())
}

/// An optional attribute of the Forward Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// Any string-valued coded attribute: context, servlet_path, remote_user, auth_type,
    /// query_string, route, ssl_cert, ssl_cipher, ssl_session, secret, stored_method.
    Coded { code: u8, value: AjpString },
    /// `req_attribute` (0x0A): a named attribute.
    Request { name: AjpString, value: AjpString },
    /// `ssl_key_size` (0x0B), an integer.
    SslKeySize(u16),
}

impl Attribute {
    pub fn code(&self) -> u8 {
        match self {
            Attribute::Coded { code, .. } => *code,
            Attribute::Request { .. } => attr::REQ_ATTRIBUTE,
            Attribute::SslKeySize(_) => attr::SSL_KEY_SIZE,
        }
    }

    /// The value of a coded string attribute with this code.
    pub fn coded_value(&self, want: u8) -> Option<&AjpString> {
        match self {
            Attribute::Coded { code, value } if *code == want => Some(value),
            _ => None,
        }
    }
}

/// The Forward Request (type 2), parsed far enough for routing and checks, and re-encodable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRequest {
    pub method: u8,
    pub protocol: AjpString,
    pub req_uri: AjpString,
    pub remote_addr: AjpString,
    pub remote_host: AjpString,
    pub server_name: AjpString,
    pub server_port: u16,
    pub is_ssl: bool,
    pub headers: Vec<Header>,
    pub attributes: Vec<Attribute>,
}

impl ForwardRequest {
    /// Parses the payload after the type byte.
    fn read(r: &mut Reader) -> Result<ForwardRequest, CodecError> {
        let method = r.u8("method")?;
        let protocol = r.string("protocol")?;
        let req_uri = r.string("req_uri")?;
        let remote_addr = r.string("remote_addr")?;
        let remote_host = r.string("remote_host")?;
        let server_name = r.string("server_name")?;
        let server_port = r.u16("server_port")?;
        let is_ssl = r.u8("is_ssl")? != 0;
        let headers = read_headers(r)?;
        let mut attributes = Vec::new();
        loop {
            let code = r.u8("attributes")?;
            let a = match code {
                attr::ARE_DONE => break,
                attr::REQ_ATTRIBUTE => Attribute::Request {
                    name: r.string("req_attribute name")?,
                    value: r.string("req_attribute value")?,
                },
                attr::SSL_KEY_SIZE => Attribute::SslKeySize(r.u16("ssl_key_size")?),
                attr::CONTEXT..=attr::STORED_METHOD => Attribute::Coded {
                    code,
                    value: r.string("attribute value")?,
                },
                other => return Err(CodecError::UnknownAttribute(other)),
            };
            if attributes.len() == MAX_ITEMS {
                return Err(CodecError::TooMany("attributes"));
            }
            attributes.push(a);
        }
        r.end()?;
        Ok(ForwardRequest {
            method,
            protocol,
            req_uri,
            remote_addr,
            remote_host,
            server_name,
            server_port,
            is_ssl,
            headers,
            attributes,
        })
    }

    /// Appends the whole packet (header included) to `out`; fails, leaving `out` as it was, if it
    /// would exceed `max` bytes.
    pub fn encode(&self, out: &mut BytesMut, max: usize) -> Result<(), CodecError> {
        let at = start(out, Direction::ToContainer);
        let r = self.write_payload(out);
        if let Err(e) = r {
            out.truncate(at - 2);
            return Err(e);
        }
        finish(out, at, max)
    }

    fn write_payload(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        out.put_u8(kind::FORWARD_REQUEST);
        out.put_u8(self.method);
        for s in [
            &self.protocol,
            &self.req_uri,
            &self.remote_addr,
            &self.remote_host,
            &self.server_name,
        ] {
            put_string(out, s)?;
        }
        out.put_u16(self.server_port);
        out.put_u8(u8::from(self.is_ssl));
        write_headers(out, &self.headers)?;
        for a in &self.attributes {
            out.put_u8(a.code());
            match a {
                Attribute::Coded { value, .. } => put_string(out, value)?,
                Attribute::Request { name, value } => {
                    put_string(out, name)?;
                    put_string(out, value)?;
                }
                Attribute::SslKeySize(n) => out.put_u16(*n),
            }
        }
        out.put_u8(attr::ARE_DONE);
        Ok(())
    }

    /// The first coded attribute with `code`.
    pub fn attribute(&self, code: u8) -> Option<&AjpString> {
        self.attributes.iter().find_map(|a| a.coded_value(code))
    }

    /// Removes every `secret` attribute and, if given, adds `secret` as the only one.
    pub fn replace_secret(&mut self, secret: Option<&Bytes>) {
        self.attributes.retain(|a| a.code() != attr::SECRET);
        if let Some(s) = secret {
            self.attributes.push(Attribute::Coded {
                code: attr::SECRET,
                value: Some(s.clone()),
            });
        }
    }

    /// The request body length from `content-length`: `Some(0)` without the header, `None`
    /// when the body length is unknown (chunked) or the header is not a number.
    pub fn content_length(&self) -> Option<u64> {
        let mut length = Some(0);
        for (name, value) in &self.headers {
            if name.is(req_header::CONTENT_LENGTH, "content-length") {
                let text = value.as_deref().and_then(|v| std::str::from_utf8(v).ok());
                return text.and_then(|t| t.trim().parse().ok());
            }
            if name.is(0, "transfer-encoding") {
                length = None;
            }
        }
        length
    }
}

/// The response headers (Send Headers, type 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendHeaders {
    pub status: u16,
    pub message: AjpString,
    pub headers: Vec<Header>,
}

/// A message from the web server to the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    ForwardRequest(Box<ForwardRequest>),
    /// A request body packet: its data (empty: no more data).
    Body(Bytes),
    Shutdown,
    /// The secure-login Ping (type 8), unused by current web servers.
    Ping,
    CPing,
}

impl ServerMessage {
    /// Decodes a `12 34` payload; `body` says whether a body packet is expected at this point
    /// (body packets carry no type byte).
    pub fn decode(payload: Bytes, body: bool) -> Result<ServerMessage, CodecError> {
        if body {
            return decode_body(payload).map(ServerMessage::Body);
        }
        let mut r = Reader { buf: payload };
        let msg = match r.u8("type").map_err(|_| CodecError::Empty)? {
            kind::FORWARD_REQUEST => {
                return Ok(ServerMessage::ForwardRequest(Box::new(ForwardRequest::read(
                    &mut r,
                )?)));
            }
            kind::SHUTDOWN => ServerMessage::Shutdown,
            kind::PING => ServerMessage::Ping,
            kind::CPING => ServerMessage::CPing,
            other => return Err(CodecError::UnexpectedType(other)),
        };
        r.end()?;
        Ok(msg)
    }

    /// Appends the whole packet to `out`.
    pub fn encode(&self, out: &mut BytesMut, max: usize) -> Result<(), CodecError> {
        match self {
            ServerMessage::ForwardRequest(f) => return f.encode(out, max),
            ServerMessage::Body(data) => return encode_body(data, out, max),
            _ => {}
        }
        let at = start(out, Direction::ToContainer);
        out.put_u8(match self {
            ServerMessage::Shutdown => kind::SHUTDOWN,
            ServerMessage::Ping => kind::PING,
            _ => kind::CPING,
        });
        finish(out, at, max)
    }
}

/// The data of a request body packet: `len | data` (an empty payload also ends the body).
pub fn decode_body(payload: Bytes) -> Result<Bytes, CodecError> {
    if payload.is_empty() {
        return Ok(payload);
    }
    let mut r = Reader { buf: payload };
    let len = r.u16("body length")?;
    let data = r.bytes(usize::from(len), "body data")?;
    r.end()?;
    Ok(data)
}

/// Appends a request body packet carrying `data` (empty `data`: the end-of-body packet
/// `12 34 00 00`).
pub fn encode_body(data: &[u8], out: &mut BytesMut, max: usize) -> Result<(), CodecError> {
    let at = start(out, Direction::ToContainer);
    if !data.is_empty() {
        out.put_u16(data.len().min(usize::from(u16::MAX)) as u16);
        out.put_slice(data);
    }
    finish(out, at, max)
}

/// Most body bytes one packet of at most `max` bytes carries (header, length field).
pub fn max_body_data(max: usize) -> usize {
    max.saturating_sub(HEADER_LEN + 2)
}

/// Most body bytes one Send Body Chunk packet of at most `max` bytes carries (header, type,
/// length, trailing NUL).
pub fn max_chunk_data(max: usize) -> usize {
    max.saturating_sub(HEADER_LEN + 4)
}

/// A message from the container to the web server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerMessage {
    SendBodyChunk(Bytes),
    SendHeaders(Box<SendHeaders>),
    EndResponse { reuse: bool },
    GetBodyChunk(u16),
    CPong,
}

impl ContainerMessage {
    /// Decodes an `AB` payload.
    pub fn decode(payload: Bytes) -> Result<ContainerMessage, CodecError> {
        let mut r = Reader { buf: payload };
        let msg = match r.u8("type").map_err(|_| CodecError::Empty)? {
            kind::SEND_BODY_CHUNK => {
                let len = r.u16("chunk length")?;
                let data = r.bytes(usize::from(len), "chunk data")?;
                // Tomcat and mod_jk end the chunk with a NUL, as after a string.
                if r.buf.len() == 1 {
                    r.u8("chunk terminator")?;
                }
                ContainerMessage::SendBodyChunk(data)
            }
            kind::SEND_HEADERS => {
                let status = r.u16("status")?;
                let message = r.string("status message")?;
                let headers = read_headers(&mut r)?;
                ContainerMessage::SendHeaders(Box::new(SendHeaders {
                    status,
                    message,
                    headers,
                }))
            }
            kind::END_RESPONSE => ContainerMessage::EndResponse {
                // A missing flag means no reuse; any non-zero value means reuse (as in mod_jk).
                reuse: r.u8("reuse").is_ok_and(|b| b != 0),
            },
            kind::GET_BODY_CHUNK => ContainerMessage::GetBodyChunk(r.u16("requested length")?),
            kind::CPONG => ContainerMessage::CPong,
            other => return Err(CodecError::UnexpectedType(other)),
        };
        r.end()?;
        Ok(msg)
    }

    /// Appends the whole packet to `out`.
    pub fn encode(&self, out: &mut BytesMut, max: usize) -> Result<(), CodecError> {
        let at = start(out, Direction::ToServer);
        let r = match self {
            ContainerMessage::SendBodyChunk(data) => {
                out.put_u8(kind::SEND_BODY_CHUNK);
                out.put_u16(data.len().min(usize::from(u16::MAX)) as u16);
                out.put_slice(data);
                out.put_u8(0);
                Ok(())
            }
            ContainerMessage::SendHeaders(h) => {
                out.put_u8(kind::SEND_HEADERS);
                out.put_u16(h.status);
                put_string(out, &h.message).and_then(|()| write_headers(out, &h.headers))
            }
            ContainerMessage::EndResponse { reuse } => {
                out.put_u8(kind::END_RESPONSE);
                out.put_u8(u8::from(*reuse));
                Ok(())
            }
            ContainerMessage::GetBodyChunk(n) => {
                out.put_u8(kind::GET_BODY_CHUNK);
                out.put_u16(*n);
                Ok(())
            }
            ContainerMessage::CPong => {
                out.put_u8(kind::CPONG);
                Ok(())
            }
        };
        if let Err(e) = r {
            out.truncate(at - 2);
            return Err(e);
        }
        finish(out, at, max)
    }
}

/// A complete response of lb's own: Send Headers with `status` and a short text body, then End
/// Response (reuse). Used for 403 and 503.
pub fn own_response(status: u16, reason: &str, reuse: bool, max: usize) -> Bytes {
    let body = Bytes::from(format!("{status} {reason}\n"));
    let mut out = BytesMut::with_capacity(128);
    let headers = vec![
        (
            HeaderName::Coded(res_header::CONTENT_TYPE),
            Some(Bytes::from_static(b"text/plain")),
        ),
        (
            HeaderName::Coded(res_header::CONTENT_LENGTH),
            Some(Bytes::from(body.len().to_string())),
        ),
    ];
    let msgs = [
        ContainerMessage::SendHeaders(Box::new(SendHeaders {
            status,
            message: Some(Bytes::from(reason.to_string())),
            headers,
        })),
        ContainerMessage::SendBodyChunk(body),
        ContainerMessage::EndResponse { reuse },
    ];
    for m in &msgs {
        // A few dozen bytes: always fits the smallest maximum.
        let _ = m.encode(&mut out, max);
    }
    out.freeze()
}

#[cfg(test)]
pub(crate) mod tests;
