//! Types and pure functions shared by the kernel (lb-ebpf) and user space (lb-userspace).
//!
//! - [`hash`]: the seeded client-IP hash and the Maglev slot it picks. Kernel and user space call the
//!   same function, so every node with the same config and seed sends a client to the same backend.
//! - [`csum`]: incremental IPv4/TCP checksum updates for the NAT rewrite.
//! - [`counters`]: the XDP program's global counters (index, name, kind, meaning), defined once for
//!   the kernel and every user-space surface.
//! - [`ipip`]: the outer IPv4 header of `forwarding = "dsr"` packets (IPIP toward the backend).
//! - [`maps`]: map names and the `#[repr(C)]` key/value types stored in the eBPF maps, each with a
//!   compile-time size assertion.
//! - [`passive`]: kernel passive health: per-backend handshake counters, refusing marks, the
//!   backups a SYN falls back to.
//! - [`rst`]: the TCP resets the XDP program answers with (RFC 793 sequence numbers, checksums,
//!   the per-CPU rate limit).
//! - [`synproxy`]: SYN cookies for the XDP SYN proxy (make, check) and the checksums of the
//!   headers it writes.
//! - [`select`]: backend selection (conntrack, affinity, Maglev ring, failover home), generic over
//!   small storage traits so the kernel and user space run the same rules.
#![no_std]

pub mod counters;
pub mod csum;
pub mod hash;
pub mod ipip;
pub mod maps;
pub mod passive;
pub mod rst;
pub mod select;
pub mod synproxy;
