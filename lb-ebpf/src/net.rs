//! On-wire header layouts read by the XDP program. `#[repr(C)]`, big-endian fields named `*_be`,
//! a size assertion for each. Only the fields the datapath reads are broken out.

/// EtherType of IPv4, host order.
pub const ETH_P_IPV4: u16 = 0x0800;
/// IP protocol numbers.
pub use lb_common::maps::IPPROTO_TCP;

/// Ethernet II header.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}
impl EthHdr {
    pub const LEN: usize = core::mem::size_of::<Self>();
}
const _: () = assert!(EthHdr::LEN == 14);

/// IPv4 header without options; the real length is `(version_ihl & 0x0f) * 4`.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check_be: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20);

/// TCP header without options.
#[repr(C)]
pub struct TcpHdr {
    pub source_be: u16,
    pub dest_be: u16,
    pub seq_be: u32,
    pub ack_seq_be: u32,
    /// Data offset (high 4 bits) and flags.
    pub doff_flags_be: u16,
    pub window_be: u16,
    pub check_be: u16,
    pub urg_ptr_be: u16,
}
impl TcpHdr {
    pub const LEN: usize = core::mem::size_of::<Self>();
}
const _: () = assert!(TcpHdr::LEN == 20);
