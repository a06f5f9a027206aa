//! [`attach_decap`]: `lb_decap`, the backends' half of `forwarding = "dsr"` where the kernel has no
//! ipip module, attached for the dsr tests and the bench's dsr bed.

use std::io;
use std::path::Path;

use aya::Ebpf;
use aya::programs::{Xdp, XdpMode};

use crate::netns::Netns;

/// `lb_decap` attached somewhere; dropping it detaches it.
pub struct Decap(#[allow(dead_code, reason = "held: its links live as long as it does")] Ebpf);

impl std::fmt::Debug for Decap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decap")
    }
}

/// Loads `lb_decap` from the eBPF object at `object` and attaches it (driver mode) to `ifname` in
/// each of `namespaces`: the backends' half of dsr where the kernel has no ipip module.
pub fn attach_decap(object: &Path, namespaces: &[&Netns], ifname: &str) -> io::Result<Decap> {
    let err = |what: &str, e: &dyn std::fmt::Display| io::Error::other(format!("{what}: {e}"));
    let mut ebpf = Ebpf::load_file(object).map_err(|e| err("load the eBPF object", &e))?;
    let prog: &mut Xdp = ebpf
        .program_mut("lb_decap")
        .ok_or_else(|| io::Error::other("no lb_decap in the eBPF object"))?
        .try_into()
        .map_err(|e| err("lb_decap", &e))?;
    prog.load().map_err(|e| err("load lb_decap", &e))?;
    for ns in namespaces {
        ns.run(|| prog.attach(ifname, XdpMode::Driver).map(|_| ()))?
            .map_err(|e| err(&format!("attach lb_decap to {ifname} in {}", ns.name()), &e))?;
    }
    Ok(Decap(ebpf))
}
