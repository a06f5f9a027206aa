//! Round trips of every packet type, streaming, limits, and the never-panics property test.

use super::*;
use proptest::prelude::*;

fn s(text: &str) -> AjpString {
    Some(Bytes::copy_from_slice(text.as_bytes()))
}

pub(crate) fn sample_request() -> ForwardRequest {
    ForwardRequest {
        method: 4,
        protocol: s("HTTP/1.1"),
        req_uri: s("/app/login;jsessionid=ABC.t1"),
        remote_addr: s("192.0.2.7"),
        remote_host: None,
        server_name: s("www.example.com"),
        server_port: 443,
        is_ssl: true,
        headers: vec![
            (HeaderName::Coded(req_header::HOST), s("www.example.com")),
            (HeaderName::Coded(req_header::COOKIE), s("a=1; JSESSIONID=XYZ.t2")),
            (HeaderName::Coded(req_header::CONTENT_LENGTH), s("11")),
            (HeaderName::Named(Bytes::from_static(b"X-Custom")), s("")),
        ],
        attributes: vec![
            Attribute::Coded {
                code: attr::QUERY_STRING,
                value: s("a=b"),
            },
            Attribute::Coded {
                code: attr::ROUTE,
                value: s("t2"),
            },
            Attribute::Coded {
                code: attr::REMOTE_USER,
                value: s("alice"),
            },
            Attribute::Coded {
                code: attr::AUTH_TYPE,
                value: s("BASIC"),
            },
            Attribute::Coded {
                code: attr::SSL_CIPHER,
                value: s("TLS_AES_128_GCM_SHA256"),
            },
            Attribute::SslKeySize(128),
            Attribute::Request {
                name: s("AJP_REMOTE_PORT"),
                value: s("51234"),
            },
            Attribute::Coded {
                code: attr::SECRET,
                value: s("s3cret"),
            },
            Attribute::Coded {
                code: attr::STORED_METHOD,
                value: s("PATCH"),
            },
            Attribute::Coded {
                code: attr::CONTEXT,
                value: None,
            },
        ],
    }
}

fn decode_one(bytes: &[u8], direction: Direction) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let f = FrameDecoder::new(direction, MAX_MAX_PACKET)
        .decode(&mut buf)
        .unwrap()
        .expect("a whole packet");
    assert!(buf.is_empty(), "one packet, nothing left");
    f
}

fn server_round_trip(msg: ServerMessage, body: bool) {
    let mut out = BytesMut::new();
    msg.encode(&mut out, DEFAULT_MAX_PACKET).unwrap();
    let f = decode_one(&out, Direction::ToContainer);
    assert_eq!(ServerMessage::decode(f.payload(), body).unwrap(), msg);
}

fn container_round_trip(msg: ContainerMessage) {
    let mut out = BytesMut::new();
    msg.encode(&mut out, DEFAULT_MAX_PACKET).unwrap();
    let f = decode_one(&out, Direction::ToServer);
    assert_eq!(ContainerMessage::decode(f.payload()).unwrap(), msg);
}

#[test]
fn every_server_packet_round_trips() {
    server_round_trip(ServerMessage::ForwardRequest(Box::new(sample_request())), false);
    server_round_trip(ServerMessage::Body(Bytes::from_static(b"hello world")), true);
    server_round_trip(ServerMessage::Body(Bytes::new()), true);
    server_round_trip(ServerMessage::Shutdown, false);
    server_round_trip(ServerMessage::Ping, false);
    server_round_trip(ServerMessage::CPing, false);
}

#[test]
fn every_container_packet_round_trips() {
    container_round_trip(ContainerMessage::SendHeaders(Box::new(SendHeaders {
        status: 302,
        message: s("Found"),
        headers: vec![
            (
                HeaderName::Coded(res_header::SET_COOKIE),
                s("JSESSIONID=A.t1; Path=/"),
            ),
            (HeaderName::Named(Bytes::from_static(b"X-Powered-By")), None),
        ],
    })));
    container_round_trip(ContainerMessage::SendBodyChunk(Bytes::from_static(b"<html>")));
    container_round_trip(ContainerMessage::SendBodyChunk(Bytes::new()));
    container_round_trip(ContainerMessage::EndResponse { reuse: true });
    container_round_trip(ContainerMessage::EndResponse { reuse: false });
    container_round_trip(ContainerMessage::GetBodyChunk(8186));
    container_round_trip(ContainerMessage::CPong);
}

#[test]
fn wire_bytes_match_the_spec() {
    let mut out = BytesMut::new();
    ServerMessage::CPing.encode(&mut out, 8192).unwrap();
    assert_eq!(&out[..], &crate::ajp::CPING);
    let mut out = BytesMut::new();
    ContainerMessage::CPong.encode(&mut out, 8192).unwrap();
    assert_eq!(&out[..], &crate::ajp::CPONG);
    let mut out = BytesMut::new();
    ContainerMessage::EndResponse { reuse: true }
        .encode(&mut out, 8192)
        .unwrap();
    assert_eq!(&out[..], &[0x41, 0x42, 0, 2, 5, 1]);
    let mut out = BytesMut::new();
    encode_body(b"", &mut out, 8192).unwrap();
    assert_eq!(&out[..], &[0x12, 0x34, 0, 0]);
    let mut out = BytesMut::new();
    encode_body(b"ab", &mut out, 8192).unwrap();
    assert_eq!(&out[..], &[0x12, 0x34, 0, 4, 0, 2, b'a', b'b']);
    // A Send Body Chunk as Tomcat writes it (trailing NUL) and without it.
    for wire in [
        &[0x41, 0x42, 0, 5, 3, 0, 1, b'x', 0][..],
        &[0x41, 0x42, 0, 4, 3, 0, 1, b'x'],
    ] {
        let f = decode_one(wire, Direction::ToServer);
        assert_eq!(
            ContainerMessage::decode(f.payload()).unwrap(),
            ContainerMessage::SendBodyChunk(Bytes::from_static(b"x"))
        );
    }
}

#[test]
fn secret_is_replaced_or_removed() {
    let mut req = sample_request();
    req.replace_secret(Some(&Bytes::from_static(b"backend")));
    let secrets: Vec<_> = req
        .attributes
        .iter()
        .filter_map(|a| a.coded_value(attr::SECRET))
        .collect();
    assert_eq!(secrets, vec![&s("backend")]);
    req.replace_secret(None);
    assert_eq!(req.attribute(attr::SECRET), None);
    // Re-encoded without the secret, the packet still decodes to the same request.
    let mut out = BytesMut::new();
    req.encode(&mut out, 8192).unwrap();
    let f = decode_one(&out, Direction::ToContainer);
    assert_eq!(
        ServerMessage::decode(f.payload(), false).unwrap(),
        ServerMessage::ForwardRequest(Box::new(req))
    );
}

#[test]
fn streaming_byte_by_byte() {
    let mut wire = BytesMut::new();
    ServerMessage::ForwardRequest(Box::new(sample_request()))
        .encode(&mut wire, 8192)
        .unwrap();
    encode_body(b"hello world", &mut wire, 8192).unwrap();
    ServerMessage::CPing.encode(&mut wire, 8192).unwrap();
    let decoder = FrameDecoder::new(Direction::ToContainer, 8192);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for b in &wire {
        buf.put_u8(*b);
        while let Some(f) = decoder.decode(&mut buf).unwrap() {
            frames.push(f);
        }
    }
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].kind(), Some(kind::FORWARD_REQUEST));
    assert_eq!(
        ServerMessage::decode(frames[1].payload(), true).unwrap(),
        ServerMessage::Body(Bytes::from_static(b"hello world"))
    );
    assert_eq!(frames[2].as_bytes().as_ref(), &crate::ajp::CPING);
}

#[test]
fn limits_and_bad_input() {
    let d = FrameDecoder::new(Direction::ToContainer, 8192);
    // Wrong magic is seen from the first two bytes.
    let mut buf = BytesMut::from(&b"GE"[..]);
    assert!(matches!(d.decode(&mut buf), Err(CodecError::BadMagic { .. })));
    let mut buf = BytesMut::from(&b"AB\x00\x01\x09"[..]);
    assert!(matches!(d.decode(&mut buf), Err(CodecError::BadMagic { .. })));
    // A length above the maximum is refused before the payload arrives.
    let mut buf = BytesMut::from(&[0x12, 0x34, 0x20, 0x00][..]);
    assert_eq!(
        d.decode(&mut buf),
        Err(CodecError::TooLarge { len: 8196, max: 8192 })
    );
    let big = FrameDecoder::new(Direction::ToContainer, 65536);
    let mut buf = BytesMut::from(&[0x12, 0x34, 0x20, 0x00][..]);
    assert_eq!(big.decode(&mut buf), Ok(None));
    // Encoding refuses what does not fit and leaves the buffer as it was.
    let mut out = BytesMut::from(&b"keep"[..]);
    let data = vec![7u8; 9000];
    assert!(encode_body(&data, &mut out, 8192).is_err());
    assert_eq!(&out[..], b"keep");
    encode_body(&data, &mut out, 65536).unwrap();
    // Truncated and trailing payloads.
    let mut full = BytesMut::new();
    sample_request().encode(&mut full, 8192).unwrap();
    let payload = Bytes::copy_from_slice(&full[HEADER_LEN..]);
    for cut in 0..payload.len() {
        assert!(
            ServerMessage::decode(payload.slice(..cut), false).is_err(),
            "cut {cut}"
        );
    }
    let mut extra = payload.to_vec();
    extra.push(0);
    assert_eq!(
        ServerMessage::decode(Bytes::from(extra), false),
        Err(CodecError::Trailing(1))
    );
    assert_eq!(
        ContainerMessage::decode(Bytes::from_static(&[0x02])),
        Err(CodecError::UnexpectedType(2))
    );
    assert_eq!(
        ServerMessage::decode(
            Bytes::from_static(&[
                0x02, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 80, 0, 0, 0, 0x42,
                0xff
            ]),
            false
        ),
        Err(CodecError::UnknownAttribute(0x42))
    );
}

#[test]
fn content_length() {
    let mut req = sample_request();
    assert_eq!(req.content_length(), Some(11));
    req.headers
        .retain(|(n, _)| !n.is(req_header::CONTENT_LENGTH, "content-length"));
    assert_eq!(req.content_length(), Some(0));
    req.headers.push((
        HeaderName::Named(Bytes::from_static(b"Transfer-Encoding")),
        s("chunked"),
    ));
    assert_eq!(req.content_length(), None);
    req.headers
        .push((HeaderName::Named(Bytes::from_static(b"Content-Length")), s("x")));
    assert_eq!(req.content_length(), None);
}

/// Decodes everything in `bytes` as both directions and every interpretation; must not panic.
fn decode_all(bytes: &[u8], max: usize) {
    for direction in [Direction::ToContainer, Direction::ToServer] {
        let d = FrameDecoder::new(direction, max);
        let mut buf = BytesMut::from(bytes);
        while let Ok(Some(f)) = d.decode(&mut buf) {
            let _ = ServerMessage::decode(f.payload(), false);
            let _ = ServerMessage::decode(f.payload(), true);
            let _ = ContainerMessage::decode(f.payload());
            if let Ok(ServerMessage::ForwardRequest(r)) = ServerMessage::decode(f.payload(), false) {
                let _ = crate::ajp::route::session_route(&r, &crate::ajp::route::RouteKeys::default());
                let _ = r.content_length();
                let mut out = BytesMut::new();
                let _ = r.encode(&mut out, max);
            }
        }
    }
    // Payloads without framing too.
    let _ = ServerMessage::decode(Bytes::copy_from_slice(bytes), false);
    let _ = ContainerMessage::decode(Bytes::copy_from_slice(bytes));
}

fn valid_packets() -> Vec<u8> {
    let mut out = BytesMut::new();
    sample_request().encode(&mut out, 8192).unwrap();
    encode_body(b"hello", &mut out, 8192).unwrap();
    ServerMessage::CPing.encode(&mut out, 8192).unwrap();
    ServerMessage::Shutdown.encode(&mut out, 8192).unwrap();
    out.to_vec()
}

fn valid_responses() -> Vec<u8> {
    let mut out = BytesMut::new();
    for m in [
        ContainerMessage::SendHeaders(Box::new(SendHeaders {
            status: 200,
            message: s("OK"),
            headers: vec![(HeaderName::Coded(res_header::CONTENT_LENGTH), s("2"))],
        })),
        ContainerMessage::SendBodyChunk(Bytes::from_static(b"hi")),
        ContainerMessage::GetBodyChunk(100),
        ContainerMessage::EndResponse { reuse: true },
        ContainerMessage::CPong,
    ] {
        m.encode(&mut out, 8192).unwrap();
    }
    out.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 1024usize..=65536) {
        decode_all(&bytes, max);
        // With a valid header in front, so the payload parsers see the random bytes.
        let mut framed = vec![0x12, 0x34, (bytes.len() >> 8) as u8, bytes.len() as u8];
        framed.extend_from_slice(&bytes);
        decode_all(&framed, max);
        framed[0] = b'A';
        framed[1] = b'B';
        decode_all(&framed, max);
    }

    #[test]
    fn mutated_packets_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        responses in any::<bool>(),
    ) {
        let mut bytes = if responses { valid_responses() } else { valid_packets() };
        for (at, value, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = value,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, value),
            }
        }
        decode_all(&bytes, 8192);
    }
}

fn ajp_string() -> impl Strategy<Value = AjpString> {
    prop_oneof![
        1 => Just(None),
        6 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| Some(Bytes::from(v))),
    ]
}

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        (0xA001u16..=0xA0FF).prop_map(HeaderName::Coded),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| HeaderName::Named(Bytes::from(v))),
    ]
}

fn attribute() -> impl Strategy<Value = Attribute> {
    prop_oneof![
        (
            (1u8..=13).prop_filter("coded string", |c| *c != attr::REQ_ATTRIBUTE
                && *c != attr::SSL_KEY_SIZE),
            ajp_string()
        )
            .prop_map(|(code, value)| Attribute::Coded { code, value }),
        (ajp_string(), ajp_string()).prop_map(|(name, value)| Attribute::Request { name, value }),
        any::<u16>().prop_map(Attribute::SslKeySize),
    ]
}

prop_compose! {
    fn forward_request()(
        method in any::<u8>(),
        strings in proptest::collection::vec(ajp_string(), 5),
        server_port in any::<u16>(),
        is_ssl in any::<bool>(),
        headers in proptest::collection::vec((header_name(), ajp_string()), 0..8),
        attributes in proptest::collection::vec(attribute(), 0..8),
    ) -> ForwardRequest {
        ForwardRequest {
            method,
            protocol: strings[0].clone(),
            req_uri: strings[1].clone(),
            remote_addr: strings[2].clone(),
            remote_host: strings[3].clone(),
            server_name: strings[4].clone(),
            server_port,
            is_ssl,
            headers,
            attributes,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_packets_round_trip(req in forward_request(), status in any::<u16>(),
        headers in proptest::collection::vec((header_name(), ajp_string()), 0..8),
        data in proptest::collection::vec(any::<u8>(), 0..300), n in any::<u16>(), reuse in any::<bool>()) {
        server_round_trip(ServerMessage::ForwardRequest(Box::new(req)), false);
        server_round_trip(ServerMessage::Body(Bytes::from(data.clone())), true);
        container_round_trip(ContainerMessage::SendHeaders(Box::new(SendHeaders {
            status,
            message: Some(Bytes::from_static(b"X")),
            headers,
        })));
        container_round_trip(ContainerMessage::SendBodyChunk(Bytes::from(data)));
        container_round_trip(ContainerMessage::GetBodyChunk(n));
        container_round_trip(ContainerMessage::EndResponse { reuse });
    }
}

/// A Forward Request with MAX_ITEMS headers and as many attributes decodes; one more of either is
/// refused, naming which.
#[test]
fn headers_and_attributes_are_counted() {
    let request = |headers: usize, attributes: usize| {
        let mut r = sample_request();
        r.headers = (0..headers)
            .map(|_| (HeaderName::Coded(req_header::HOST), s("h")))
            .collect();
        r.attributes = (0..attributes)
            .map(|_| Attribute::Coded {
                code: attr::ROUTE,
                value: s("r"),
            })
            .collect();
        let mut out = BytesMut::new();
        r.encode(&mut out, MAX_MAX_PACKET).unwrap();
        ServerMessage::decode(out.freeze().slice(HEADER_LEN..), false)
    };
    assert!(request(MAX_ITEMS, MAX_ITEMS).is_ok());
    assert_eq!(request(MAX_ITEMS + 1, 0), Err(CodecError::TooMany("headers")));
    assert_eq!(request(0, MAX_ITEMS + 1), Err(CodecError::TooMany("attributes")));
}
