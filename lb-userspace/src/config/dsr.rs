//! What the backends of a `forwarding = "dsr"` service need, as `lb check-config` prints it: the
//! VIP on a local interface, a tunnel device that takes the LB's IPIP packets, `rp_filter` relaxed
//! on it, ARP kept off the VIP, and an MSS that leaves room for the 20-byte outer header.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{Config, Forwarding};

/// The setup text for every dsr service of `config` (empty when it has none).
pub fn backend_setup(config: &Config) -> String {
    let mut out = String::new();
    for s in config.services.iter().filter(|s| s.forwarding == Forwarding::Dsr) {
        let vip = s.listen.ip();
        let hosts: BTreeSet<IpAddr> = s.backends.iter().map(|b| b.address.ip()).collect();
        let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "service \"{}\" forwards with dsr: lb sends each client packet unchanged, IPIP-encapsulated to the backend, which answers the client directly.",
            s.name
        );
        let _ = writeln!(
            out,
            "every backend ({}) needs, as root (and in its boot configuration):",
            if hosts.is_empty() {
                "none yet".to_owned()
            } else {
                hosts.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "  ip addr add {vip}/32 dev lo                    # the VIP on a local interface"
        );
        let _ = writeln!(
            out,
            "  modprobe ipip && ip link set tunl0 up          # decapsulates lb's IPIP packets (tunl0 is the fallback device ipip creates)"
        );
        let _ = writeln!(
            out,
            "  sysctl -w net.ipv4.conf.tunl0.rp_filter=2      # loose: the inner source (the client) is not routed via tunl0"
        );
        let _ = writeln!(
            out,
            "  sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2   # the VIP on lo answers no ARP"
        );
        let _ = writeln!(
            out,
            "  ip route change default via GATEWAY dev IFACE advmss 1440   # MSS 20 bytes under the link's (1460 on 1500): room for the outer header"
        );
        let _ = writeln!(
            out,
            "and the application must listen on {vip}:{port} (or 0.0.0.0:{port}); its replies go to the clients through the backend's own default route, never through lb.",
            port = s.listen.port()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_vip_port_and_backends_of_dsr_services_only() {
        let c = Config::parse(
            "[xdp]\ninterfaces = [\"eth0\"]\n\
             [[service]]\nname = \"n\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\n\
             [[service.backend]]\naddress = \"10.0.1.9:8080\"\n\
             [[service]]\nname = \"d\"\nlisten = \"10.0.0.2:443\"\ndatapath = \"xdp\"\nforwarding = \"dsr\"\n\
             [[service.backend]]\naddress = \"10.0.1.1:443\"\n[[service.backend]]\naddress = \"10.0.1.2:443\"\n",
            "t.toml",
        )
        .unwrap();
        let text = backend_setup(&c);
        assert!(text.contains("service \"d\" forwards with dsr"), "{text}");
        assert!(!text.contains("service \"n\""), "{text}");
        assert!(text.contains("(10.0.1.1, 10.0.1.2)"), "{text}");
        assert!(text.contains("ip addr add 10.0.0.2/32 dev lo"), "{text}");
        assert!(text.contains("ip link set tunl0 up"), "{text}");
        assert!(text.contains("tunl0.rp_filter=2"), "{text}");
        assert!(text.contains("listen on 10.0.0.2:443"), "{text}");
        assert!(!text.contains("10.0.1.9"), "{text}");
    }
}
