//! The session route of a request: the part after the last `.` of the session id (Tomcat appends
//! `.jvmRoute` to the ids it hands out), taken from a `;jsessionid=` path parameter of the URI or
//! from the `JSESSIONID` cookie. Names are configurable; the path parameter is looked at first,
//! as mod_jk and mod_proxy_balancer do.

use super::codec::{ForwardRequest, req_header};

/// Where session ids are looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteKeys {
    /// Cookie names, in order of preference (case-sensitive, as Tomcat).
    pub cookies: Vec<String>,
    /// URI path parameter names (`;name=value`), in order of preference.
    pub path_params: Vec<String>,
}

impl Default for RouteKeys {
    fn default() -> Self {
        RouteKeys {
            cookies: vec!["JSESSIONID".into()],
            path_params: vec!["jsessionid".into()],
        }
    }
}

/// The route of a session id: after the first `.`, if non-empty. Tomcat writes `<id>.<jvmRoute>`
/// and its ids hold no dot, while a jvmRoute may (`app01.prod`); mod_jk and mod_proxy_balancer
/// read it the same way.
fn route_of(session_id: &[u8]) -> Option<&[u8]> {
    let dot = session_id.iter().position(|&b| b == b'.')?;
    let route = &session_id[dot + 1..];
    (!route.is_empty()).then_some(route)
}

/// The value of path parameter `name` in `uri` (`/a;name=v/b` → `v`).
fn path_param<'a>(uri: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut rest = uri;
    while let Some(semi) = rest.iter().position(|&b| b == b';') {
        rest = &rest[semi + 1..];
        if let Some(value) = rest.strip_prefix(name).and_then(|r| r.strip_prefix(b"=")) {
            let end = value
                .iter()
                .position(|b| matches!(b, b';' | b'/' | b'?' | b'#'))
                .unwrap_or(value.len());
            return Some(&value[..end]);
        }
    }
    None
}

/// The values of cookie `name` in one Cookie header value, in order.
fn cookies<'h>(header: &'h [u8], name: &[u8]) -> impl Iterator<Item = &'h [u8]> {
    header.split(|&b| b == b';' || b == b',').filter_map(move |pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        if pair[..eq].trim_ascii() != name {
            return None;
        }
        let value = pair[eq + 1..].trim_ascii();
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

/// The session route of `req`, if any: the first path parameter of `keys.path_params` whose value
/// has a route, else the first cookie of `keys.cookies` (over all Cookie headers) that has one.
pub fn session_route<'a>(req: &'a ForwardRequest, keys: &RouteKeys) -> Option<&'a [u8]> {
    if let Some(uri) = req.req_uri.as_deref() {
        for name in &keys.path_params {
            if let Some(route) = path_param(uri, name.as_bytes()).and_then(route_of) {
                return Some(route);
            }
        }
    }
    let headers: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|(n, _)| n.is(req_header::COOKIE, "cookie"))
        .filter_map(|(_, v)| v.as_deref())
        .collect();
    for name in &keys.cookies {
        for h in &headers {
            if let Some(route) = cookies(h, name.as_bytes()).find_map(route_of) {
                return Some(route);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ajp::codec::HeaderName;
    use bytes::Bytes;

    fn req(uri: &str, cookie_headers: &[&str]) -> ForwardRequest {
        let mut r = crate::ajp::codec::tests::sample_request();
        r.req_uri = Some(Bytes::copy_from_slice(uri.as_bytes()));
        r.headers = cookie_headers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Alternate the coded and the spelled-out header name.
                let name = if i % 2 == 0 {
                    HeaderName::Coded(req_header::COOKIE)
                } else {
                    HeaderName::Named(Bytes::from_static(b"Cookie"))
                };
                (name, Some(Bytes::copy_from_slice(c.as_bytes())))
            })
            .collect();
        r
    }

    fn route(uri: &str, cookies: &[&str]) -> Option<String> {
        let r = req(uri, cookies);
        session_route(&r, &RouteKeys::default()).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    #[test]
    fn cookie_route() {
        assert_eq!(
            route("/", &["JSESSIONID=8A3F.tomcat2"]).as_deref(),
            Some("tomcat2")
        );
        // Several cookies, the session one in the middle, in the second header.
        assert_eq!(
            route("/", &["theme=dark; lang=en", "a=b.c; JSESSIONID=\"X.t3\" ; z=1"]).as_deref(),
            Some("t3")
        );
        // A jvmRoute with a dot in it: everything after the id's first dot.
        assert_eq!(
            route("/", &["JSESSIONID=8A3F.app01.prod"]).as_deref(),
            Some("app01.prod")
        );
        // Similar names do not count.
        assert_eq!(
            route("/", &["XJSESSIONID=a.t1; jsessionid=b.t2; JSESSIONID2=c.t3"]),
            None
        );
    }

    #[test]
    fn path_parameter_wins_over_cookie() {
        assert_eq!(
            route("/app/x.jsp;jsessionid=ABC.t1?q=1", &["JSESSIONID=DEF.t2"]).as_deref(),
            Some("t1")
        );
        assert_eq!(route("/app;jsessionid=ABC.t1/page", &[]).as_deref(), Some("t1"));
        assert_eq!(
            route("/app;foo=1;jsessionid=ABC.t1;bar=2", &[]).as_deref(),
            Some("t1")
        );
        // A path parameter without a route falls back to the cookie.
        assert_eq!(
            route("/app;jsessionid=ABC", &["JSESSIONID=DEF.t2"]).as_deref(),
            Some("t2")
        );
    }

    #[test]
    fn no_route() {
        assert_eq!(route("/", &[]), None);
        assert_eq!(route("/index.html", &["other=1.2"]), None);
        assert_eq!(route("/", &["JSESSIONID=8A3F"]), None, "no dot: no route");
    }

    #[test]
    fn empty_values() {
        assert_eq!(route("/", &["JSESSIONID="]), None);
        assert_eq!(route("/", &["JSESSIONID=abc."]), None);
        assert_eq!(route("/", &["JSESSIONID=\"\""]), None);
        assert_eq!(route("/", &[""]), None);
        assert_eq!(route("/;jsessionid=", &[";;=;"]), None);
        assert_eq!(route("/;jsessionid=.", &["=; JSESSIONID"]), None);
        // An empty first session cookie does not hide a later one with a route.
        assert_eq!(
            route("/", &["JSESSIONID=; JSESSIONID=A.t1"]).as_deref(),
            Some("t1")
        );
    }

    #[test]
    fn unknown_route_is_still_extracted() {
        // Matching against backends is the datapath's business: any route text comes out.
        assert_eq!(
            route("/", &["JSESSIONID=A.no-such-node"]).as_deref(),
            Some("no-such-node")
        );
    }

    #[test]
    fn configured_names() {
        let keys = RouteKeys {
            cookies: vec!["SESSION".into(), "JSESSIONID".into()],
            path_params: vec!["sid".into()],
        };
        let r = req("/a;jsessionid=A.t1", &["JSESSIONID=B.t2; SESSION=C.t3"]);
        assert_eq!(
            session_route(&r, &keys),
            Some(&b"t3"[..]),
            "first configured cookie name wins"
        );
        let r = req("/a;sid=A.t1", &["SESSION=C.t3"]);
        assert_eq!(session_route(&r, &keys), Some(&b"t1"[..]));
        let r = req("/a;jsessionid=A.t1", &[]);
        assert_eq!(
            session_route(&r, &keys),
            None,
            "jsessionid is not configured here"
        );
    }

    #[test]
    fn oversized_cookie_header() {
        let mut big = String::new();
        for i in 0..3000 {
            big.push_str(&format!("c{i}=v{i}.x; "));
        }
        big.push_str("JSESSIONID=ZZZ.t9");
        assert!(big.len() > 30_000);
        assert_eq!(route("/", &[big.as_str()]).as_deref(), Some("t9"));
        // The same request fits a 64 KiB packet and survives the codec.
        let r = req("/", &[big.as_str()]);
        let mut out = bytes::BytesMut::new();
        r.encode(&mut out, 65536).unwrap();
        assert!(r.encode(&mut bytes::BytesMut::new(), 8192).is_err());
    }
}
