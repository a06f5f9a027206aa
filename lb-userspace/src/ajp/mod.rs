//! AJP 1.3: the CPing/CPong probe of Tomcat's AJP connector (port 8009), used by the health
//! checks, and the full codec ([`codec`]) and session routes ([`route`]) of `datapath = "ajp"`.
//!
//! CPing is a container→server packet `12 34 | 00 01 | 0A` (magic, length 1, type 10); the server
//! answers with the server→container packet `41 42 | 00 01 | 09` ("AB", length 1, type 9). A CPing
//! needs no AJP secret; a Tomcat that is shutting down stops answering.

pub mod codec;
pub mod route;

/// CPing request.
pub const CPING: [u8; 5] = [0x12, 0x34, 0x00, 0x01, 0x0A];
/// The only acceptable reply.
pub const CPONG: [u8; 5] = [0x41, 0x42, 0x00, 0x01, 0x09];

/// Why a reply is not a CPong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AjpError {
    #[error("connection closed before any reply")]
    NoReply,
    #[error("short reply ({got} of 5 bytes: {bytes})")]
    Short { got: usize, bytes: String },
    #[error("not an AJP server packet (magic {0}; expected 41 42)")]
    BadMagic(String),
    #[error("AJP packet of length {0}, expected 1 for CPong")]
    BadLength(u16),
    #[error("AJP packet type {0:#04x}, expected 0x09 (CPong)")]
    BadType(u8),
    #[error("{0} unexpected bytes after the CPong")]
    Extra(usize),
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks everything the peer sent before closing or going quiet.
pub fn check_reply(reply: &[u8]) -> Result<(), AjpError> {
    if reply.len() >= 2 && reply[..2] != CPONG[..2] {
        return Err(AjpError::BadMagic(hex(&reply[..2])));
    }
    if reply.len() >= 4 {
        let length = u16::from_be_bytes([reply[2], reply[3]]);
        if length != 1 {
            return Err(AjpError::BadLength(length));
        }
    }
    if reply.len() >= 5 && reply[4] != CPONG[4] {
        return Err(AjpError::BadType(reply[4]));
    }
    match reply.len() {
        0 => Err(AjpError::NoReply),
        n if n < 5 => Err(AjpError::Short {
            got: n,
            bytes: hex(reply),
        }),
        5 => Ok(()),
        n => Err(AjpError::Extra(n - 5)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpong_is_good() {
        assert_eq!(check_reply(&CPONG), Ok(()));
    }

    #[test]
    fn malformed_replies() {
        assert_eq!(check_reply(&[]), Err(AjpError::NoReply));
        assert_eq!(
            check_reply(&[0x41, 0x42, 0x00]),
            Err(AjpError::Short {
                got: 3,
                bytes: "41 42 00".into()
            })
        );
        assert_eq!(
            check_reply(&[0xde, 0xad, 0xbe, 0xef, 0x00]),
            Err(AjpError::BadMagic("de ad".into()))
        );
        assert_eq!(
            check_reply(&[0x41, 0x42, 0x00, 0x02, 0x09]),
            Err(AjpError::BadLength(2))
        );
        assert_eq!(
            check_reply(&[0x41, 0x42, 0x00, 0x01, 0x04]),
            Err(AjpError::BadType(0x04))
        );
        let mut extra = CPONG.to_vec();
        extra.extend_from_slice(&[1, 2, 3]);
        assert_eq!(check_reply(&extra), Err(AjpError::Extra(3)));
        // An HTTP server on the AJP port.
        assert!(matches!(check_reply(b"HTTP/1.1 400"), Err(AjpError::BadMagic(_))));
        // The CPing echoed back.
        assert!(matches!(check_reply(&CPING), Err(AjpError::BadMagic(_))));
    }
}
