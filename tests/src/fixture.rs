//! The fixture namespace for BPF_PROG_TEST_RUN: a throwaway network namespace (the calling
//! thread's own, gone with the thread) holding a client-side and a backend-side veth link with
//! addresses, IP forwarding and permanent neighbours, so `bpf_fib_lookup` in the XDP program gets
//! real answers. Used by lb-userspace's XDP fixtures and by `lb-microbench`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use thiserror::Error;

/// Client-side link (VIP and [`LB_CLIENT_SIDE`] on it) and backend-side link ([`LB_BACKEND_SIDE`]).
pub const CLIENT_LINK: &str = "fxc";
pub const BACKEND_LINK: &str = "fxb";
/// The namespace's own address toward the clients (10.0.0.0/24).
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The namespace's address toward the backends (10.1.1.0/24), the SNAT source.
pub const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);

/// What to put in the namespace besides the links: the VIP (a /32 on the client link) and the
/// permanent neighbours on each side.
#[derive(Clone, Debug, Default)]
pub struct FixtureSpec {
    pub vip: Option<Ipv4Addr>,
    pub clients: Vec<(Ipv4Addr, [u8; 6])>,
    pub backends: Vec<(Ipv4Addr, [u8; 6])>,
}

/// Interface indexes of the two links, as the XDP program sees them in `ingress_ifindex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixtureLinks {
    pub client_if: u32,
    pub backend_if: u32,
}

/// Why the fixture namespace could not be set up.
#[derive(Debug, Error)]
pub enum FixtureError {
    #[error("unshare(CLONE_NEWNET): {0}")]
    Unshare(nix::Error),
    #[error("{0}: {1}")]
    Command(String, String),
    #[error("if_nametoindex({0}): {1}")]
    Index(&'static str, nix::Error),
}

/// `aa:bb:…` text of a MAC address.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn sh(cmd: &str) -> Result<(), FixtureError> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| FixtureError::Command(cmd.to_string(), e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(FixtureError::Command(cmd.to_string(), err))
    }
}

/// `ip -batch -` with `lines` on its standard input.
fn ip_batch(lines: &str) -> Result<(), FixtureError> {
    let fail = |e: String| FixtureError::Command("ip -batch".into(), e);
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(lines.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Moves the calling thread into a new network namespace and sets up the fixture topology there.
/// Only for a thread of its own: the namespace goes away when the thread ends (see
/// [`in_fixture_netns`]).
pub fn enter_fixture_netns(spec: &FixtureSpec) -> Result<FixtureLinks, FixtureError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(FixtureError::Unshare)?;
    sh("ip link set lo up")?;
    for link in [CLIENT_LINK, BACKEND_LINK] {
        sh(&format!(
            "ip link add {link} type veth peer name {link}p && ip link set {link} up && ip link set {link}p up"
        ))?;
    }
    sh(&format!("ip addr add {LB_CLIENT_SIDE}/24 dev {CLIENT_LINK}"))?;
    if let Some(vip) = spec.vip {
        sh(&format!("ip addr add {vip}/32 dev {CLIENT_LINK}"))?;
    }
    sh(&format!("ip addr add {LB_BACKEND_SIDE}/24 dev {BACKEND_LINK}"))?;
    sh("sysctl -qw net.ipv4.ip_forward=1")?;
    let mut neighbours = String::new();
    for (link, list) in [(CLIENT_LINK, &spec.clients), (BACKEND_LINK, &spec.backends)] {
        for (ip, mac) in list {
            neighbours.push_str(&format!(
                "neigh add {ip} lladdr {} dev {link} nud permanent\n",
                mac_text(*mac)
            ));
        }
    }
    if !neighbours.is_empty() {
        ip_batch(&neighbours)?;
    }
    let index =
        |name: &'static str| nix::net::if_::if_nametoindex(name).map_err(|e| FixtureError::Index(name, e));
    Ok(FixtureLinks {
        client_if: index(CLIENT_LINK)?,
        backend_if: index(BACKEND_LINK)?,
    })
}

/// Runs `f` on a new thread inside a fresh fixture namespace; the namespace is gone afterwards.
pub fn in_fixture_netns<T: Send>(
    spec: &FixtureSpec,
    f: impl FnOnce(FixtureLinks) -> T + Send,
) -> Result<T, FixtureError> {
    std::thread::scope(|s| {
        s.spawn(|| enter_fixture_netns(spec).map(f))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
