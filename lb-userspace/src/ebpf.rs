//! The eBPF object embedded in `lb` and loading it.
//!
//! `build.rs` copies the object built by `cargo xtask build` (lb-ebpf, `bpfel-unknown-none`) into
//! `OUT_DIR` and sets `cfg(lb_ebpf_object)`; without it [`object`] is `None` and [`load`] says how to
//! build one. Attaching, pinning and map updates live in the XDP datapath, not here.

use thiserror::Error;

/// Name of the XDP entry point in the object (`#[xdp] fn lb_xdp` in lb-ebpf).
pub const XDP_PROGRAM: &str = "lb_xdp";
/// Name of the TC ingress entry point (`[xdp] mode = "tc"`; a SCHED_CLS program in lb-ebpf).
pub use lb_common::synproxy::TC_PROGRAM;

#[cfg(lb_ebpf_object)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The embedded eBPF object (8-byte aligned ELF), or `None` if `lb` was built without it.
pub fn object() -> Option<&'static [u8]> {
    #[cfg(lb_ebpf_object)]
    {
        Some(OBJECT)
    }
    #[cfg(not(lb_ebpf_object))]
    {
        None
    }
}

/// Errors from [`load`].
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("lb was built without its eBPF object; build with `cargo xtask build`")]
    NotEmbedded,
    #[error("loading the embedded eBPF object failed (are you root, or do you have CAP_BPF?): {0}")]
    Load(#[from] aya::EbpfError),
}

/// Parses the embedded object and creates its maps. Programs are not loaded into the kernel yet:
/// get one with `program_mut(XDP_PROGRAM)` and call `load()`.
pub fn load() -> Result<aya::Ebpf, LoadError> {
    let object = object().ok_or(LoadError::NotEmbedded)?;
    Ok(aya::Ebpf::load(object)?)
}

#[cfg(test)]
mod tests {
    //! BPF_PROG_TEST_RUN fixtures for `lb_xdp`: input frame → expected verdict, output bytes and
    //! counters. Need root and the embedded object; skipped otherwise (failed instead when
    //! `LB_REQUIRE_EBPF=1`, as `cargo xtask test` sets).

    use aya::{
        Ebpf, TestRun, TestRunOptions,
        maps::PerCpuArray,
        programs::{ProgramError, Xdp},
    };
    use std::net::Ipv4Addr;

    use lb_common::maps::{Counter, MAP_GLOBAL_STATS, global_counter};
    use lb_tests::packet::{self, Tcp, flags};

    use super::*;

    const XDP_PASS: u32 = 2;

    /// The loaded object with `lb_xdp` loaded into the kernel, or `None` (after printing why) when
    /// the test has to be skipped.
    fn loaded(test: &str) -> Option<Ebpf> {
        if object().is_none() {
            assert!(
                !std::env::var_os("LB_REQUIRE_EBPF").is_some_and(|v| v == "1"),
                "{test}: LB_REQUIRE_EBPF=1 but {}",
                LoadError::NotEmbedded
            );
            eprintln!("SKIP: {test}: {}", LoadError::NotEmbedded);
            return None;
        }
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: {test} needs root");
            return None;
        }
        let mut ebpf = load().expect("load the embedded object");
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .expect("lb_xdp in the object")
            .try_into()
            .expect("lb_xdp is an XDP program");
        if let Err(e) = prog.load() {
            panic!("verifier rejected {XDP_PROGRAM}: {}", whole_chain(&e));
        }
        Some(ebpf)
    }

    /// An error with its whole source chain, a line each (the verifier log is in the chain).
    fn whole_chain(e: &dyn std::error::Error) -> String {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(&format!("\n{s}"));
            src = s.source();
        }
        msg
    }

    fn program(ebpf: &Ebpf) -> &Xdp {
        ebpf.program(XDP_PROGRAM).unwrap().try_into().unwrap()
    }

    /// Runs the program once on `frame`: (verdict, output frame).
    fn run(ebpf: &Ebpf, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let res = program(ebpf).test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Global counter `index` summed over all CPUs.
    fn global(ebpf: &Ebpf, index: u32) -> Counter {
        let map = ebpf.map(MAP_GLOBAL_STATS).expect("global stats map");
        let stats = PerCpuArray::<_, Counter>::try_from(map).expect("per-CPU array of Counter");
        let per_cpu = stats.get(&index, 0).expect("read counter");
        per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        })
    }

    const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 1), 40000);
    const SERVER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 2), 80);

    /// Ethernet + IPv4 (IHL 5) + TCP SYN, 10.0.0.1:40000 → 10.0.0.2:80.
    fn tcp_syn() -> Vec<u8> {
        Tcp::new(CLIENT, SERVER, flags::SYN).build()
    }

    /// Ethernet broadcast ARP request: who has 10.0.0.2, tell 10.0.0.1.
    fn arp_request() -> Vec<u8> {
        packet::arp_request([0x02, 0, 0, 0, 0, 0x01], CLIENT.0, SERVER.0)
    }

    #[test]
    fn ebpf_object_matches_the_build() {
        let Some(obj) = object() else {
            assert!(
                !std::env::var_os("LB_REQUIRE_EBPF").is_some_and(|v| v == "1"),
                "LB_REQUIRE_EBPF=1 but {}",
                LoadError::NotEmbedded
            );
            eprintln!("SKIP: ebpf_object_matches_the_build: {}", LoadError::NotEmbedded);
            return;
        };
        assert_eq!(obj.as_ptr() as usize % 8, 0, "object must be 8-byte aligned");
        assert_eq!(&obj[..4], b"\x7fELF");
    }

    /// The TC twins of `lb_xdp` and `lb_synproxy` (`[xdp] mode = "tc"`) pass the verifier.
    #[test]
    fn ebpf_tc_programs_pass_the_verifier() {
        let Some(mut ebpf) = loaded("ebpf_tc_programs_pass_the_verifier") else {
            return;
        };
        for name in ["lb_tc", "lb_synproxy_tc"] {
            let prog: &mut aya::programs::SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} in the object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is a TC classifier: {e}"));
            if let Err(e) = prog.load() {
                panic!("verifier rejected {name}: {}", whole_chain(&e));
            }
        }
    }

    #[test]
    fn ebpf_tcp_frame_passes_unchanged() {
        let Some(ebpf) = loaded("ebpf_tcp_frame_passes_unchanged") else {
            return;
        };
        let frame = tcp_syn();
        let (verdict, out) = run(&ebpf, &frame).expect("test run");
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, frame, "output bytes must equal input");
        let packets = global(&ebpf, global_counter::PACKETS);
        assert_eq!(packets.packets, 1);
        assert_eq!(packets.bytes, frame.len() as u64);
        assert_eq!(global(&ebpf, global_counter::PASSED).packets, 1);
        assert_eq!(global(&ebpf, global_counter::TRUNCATED).packets, 0);
    }

    #[test]
    fn ebpf_arp_passes() {
        let Some(ebpf) = loaded("ebpf_arp_passes") else {
            return;
        };
        let frame = arp_request();
        let (verdict, out) = run(&ebpf, &frame).expect("test run");
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, frame);
        assert_eq!(global(&ebpf, global_counter::PASSED).packets, 1);
        assert_eq!(global(&ebpf, global_counter::TRUNCATED).packets, 0);
    }

    #[test]
    fn ebpf_truncated_frames_pass_and_count() {
        let Some(ebpf) = loaded("ebpf_truncated_frames_pass_and_count") else {
            return;
        };
        let full = tcp_syn();
        let mut ihl15 = full.clone(); // claims 60 bytes of IPv4 header, carries 40 bytes after Ethernet
        ihl15[14] = 0x4f;
        // (case, frame, the reason counted): a frame shorter than what it claims is truncated; an
        // IHL beyond the IP total length is malformed (the lengths disagree with each other).
        let (t, m) = (global_counter::TRUNCATED, global_counter::MALFORMED);
        let cases: [(&str, Vec<u8>, u32); 4] = [
            ("10-byte frame", full[..10].to_vec(), t),
            ("IPv4 header cut short", full[..14 + 10].to_vec(), t),
            ("TCP header cut short", full[..14 + 20 + 8].to_vec(), t),
            ("IHL 15 beyond the total length", ihl15, m),
        ];
        let mut expected = 0;
        for (name, frame, reason) in &cases {
            let before = global(&ebpf, *reason).packets;
            match run(&ebpf, frame) {
                Ok((verdict, out)) => {
                    assert_eq!(verdict, XDP_PASS, "{name}");
                    assert_eq!(&out, frame, "{name}: output bytes");
                    let after = global(&ebpf, *reason).packets;
                    assert_eq!(after, before + 1, "{name}: reason counter");
                    expected += 1;
                }
                // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header with EINVAL
                // (net/bpf/test_run.c, bpf_test_init); a NIC does not deliver such frames either.
                Err(ProgramError::SyscallError(e))
                    if frame.len() < 14 && e.io_error.raw_os_error() == Some(nix::libc::EINVAL) =>
                {
                    eprintln!("note: {name}: kernel refused the test run (EINVAL), as expected");
                }
                Err(e) => panic!("{name}: test run failed: {e}"),
            }
        }
        assert_eq!(global(&ebpf, global_counter::PACKETS).packets, expected);
        assert_eq!(global(&ebpf, global_counter::PASSED).packets, expected);
    }
}
