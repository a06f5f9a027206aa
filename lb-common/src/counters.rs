//! The XDP program's global counters, defined once: the kernel's index of each, and for user space
//! its name, kind and meaning, which `lb status`, `lb stats`, `lb top` and `/metrics` all render.
//!
//! Adding a counter is one line in the [`xdp_counters!`] table below: the kernel then counts with
//! `global_counter::NAME` and every surface shows it by its kind.

/// What a global counter counts, which decides where the surfaces show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CounterKind {
    /// Every packet the program saw: the sum of the verdicts.
    All,
    /// A packet's verdict: each packet gets exactly one.
    Verdict,
    /// Connections set up.
    Flows,
    /// Why a packet got its verdict; counted on top of the verdict.
    Reason,
    /// A state user space reports in the counter's place (0 or 1), not a packet count: the
    /// kernel never counts it.
    State,
}

/// The table: `Variant, CONST = index, "name", Kind, "meaning";`, one line a counter, listed in the
/// order the surfaces show them. The index is where the kernel counts it in
/// [`MAP_GLOBAL_STATS`](crate::maps::MAP_GLOBAL_STATS); indices are `0..COUNT`, each once (checked at
/// compile time), and a counter keeps its index (the map is pinned across restarts).
macro_rules! xdp_counters {
    ($($variant:ident, $konst:ident = $index:literal, $name:literal, $kind:ident, $help:literal;)*) => {
        /// One of the XDP program's global counters.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum XdpCounter {
            $(#[doc = $help] $variant = $index,)*
        }

        impl XdpCounter {
            /// Every counter, in the order the surfaces show them.
            pub const ALL: [XdpCounter; COUNT] = [$(XdpCounter::$variant,)*];

            /// The counter's name: its key under `xdp` in `lb status --json`/`lb stats --json`, and
            /// its label value on `/metrics`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(XdpCounter::$variant => $name,)*
                }
            }

            /// What the counter counts.
            pub const fn kind(self) -> CounterKind {
                match self {
                    $(XdpCounter::$variant => CounterKind::$kind,)*
                }
            }

            /// One sentence on what the counter counts, without a final period.
            pub const fn help(self) -> &'static str {
                match self {
                    $(XdpCounter::$variant => $help,)*
                }
            }
        }

        /// Number of counters: entries of [`MAP_GLOBAL_STATS`](crate::maps::MAP_GLOBAL_STATS).
        const COUNT: usize = [$($index,)*].len();

        /// The counters' indices into [`MAP_GLOBAL_STATS`](crate::maps::MAP_GLOBAL_STATS), as the
        /// kernel uses them (`count(gc::DROPPED, …)`).
        pub mod global_counter {
            $(#[doc = $help] pub const $konst: u32 = super::XdpCounter::$variant as u32;)*
            /// Number of counters.
            pub const COUNT: u32 = super::COUNT as u32;
            /// Names in index order.
            pub const NAMES: [&str; super::COUNT] = super::names_by_index();
        }
    };
}

xdp_counters! {
    Packets, PACKETS = 0, "packets", All, "Packets seen by the XDP program";
    Forwarded, FORWARDED = 3, "forwarded", Verdict, "Rewritten and sent (XDP_TX or XDP_REDIRECT)";
    Passed, PASSED = 1, "passed", Verdict, "Handed to the kernel stack (XDP_PASS)";
    Dropped, DROPPED = 4, "dropped", Verdict, "Dropped";
    NewFlows, NEW_FLOWS = 12, "new_flows", Flows, "Connections set up by the kernel";
    NoBackend, NO_BACKEND = 7, "no_backend", Reason, "SYN to a service with no backend taking new clients (dropped)";
    NoConntrack, NO_CONNTRACK = 6, "no_conntrack", Reason, "Non-SYN packet to a VIP without a connection: answered with an RST (never sent to a random backend)";
    SnatExhausted, SNAT_EXHAUSTED = 8, "snat_exhausted", Reason, "No free SNAT port after several tries (dropped)";
    FibFailed, FIB_FAILED = 10, "fib_failed", Reason, "No route for the rewritten packet (dropped)";
    Fragment, FRAGMENT = 5, "fragment", Reason, "IPv4 fragment: passed, except a first fragment to a VIP's port, dropped (reassembled by the host's kernel it would meet no socket there and reset the client's connection; the fragments left time out in reassembly)";
    NoNeigh, NO_NEIGH = 9, "no_neigh", Reason, "Next hop's MAC unknown; the rewritten packet is passed so the kernel resolves it";
    Malformed, MALFORMED = 11, "malformed", Reason, "IPv4 header length, total length and TCP data offset disagree (passed untouched, before any state; the kernel drops it)";
    Truncated, TRUNCATED = 2, "truncated", Reason, "Frame shorter than its IPv4 total length or the headers it claims (passed untouched, before any state)";
    NoReplyFlow, NO_REPLY_FLOW = 13, "no_reply_flow", Reason, "A backend's packet to a SNAT address and port with no live flow: answered with an RST (never passed to the LB's own stack)";
    ResetFlow, RESET_FLOW = 14, "reset_flow", Reason, "Packet of a connection reset by on_down = \"reset\" or `lb backend disable --reset`: answered with an RST";
    RstSent, RST_SENT = 15, "rst_sent", Reason, "TCP RST sent by XDP back out to a packet's sender (no_conntrack, no_reply_flow, reset_flow)";
    RstLimited, RST_LIMITED = 16, "rst_limited", Reason, "RST not sent, over the per-CPU rate limit (the packet was dropped)";
    BadTcpFlags, BAD_TCP_FLAGS = 17, "bad_tcp_flags", Reason, "SYN carrying RST or FIN (dropped before any state)";
    BadSource, BAD_SOURCE = 18, "bad_source", Reason, "Impossible TCP source: 0.0.0.0/8, 127/8, multicast, 255.255.255.255 or the destination itself (dropped before any state)";
    HalfOpenReclaimed, HALF_OPEN_RECLAIMED = 19, "half_open_reclaimed", Reason, "A SYN took the SNAT port of a half-open flow (no port was free: a SYN flood or a slow client); that flow's entries were removed";
    ClosedReused, CLOSED_REUSED = 20, "closed_reused", Reason, "A SYN took the SNAT port of a closed connection still in closed_timeout (quiet for 100 ms; none of the ports it tried was free): the range turns over faster than closed_timeout";
    DsrMidFlow, DSR_MID_FLOW = 21, "dsr_mid_flow", Reason, "Non-SYN packet to a dsr service without a connection on this node (another node's flow, or one forgotten): forwarded to the backend its client maps to now (affinity, else the ring), never reset";
    TooBig, TOO_BIG = 22, "too_big", Reason, "Rewritten or encapsulated packet larger than the MTU toward its next hop (dropped; checked when the next hop is looked up, which a dsr flow does again for a packet larger than any before); for dsr (20 bytes of IPIP more) lower the MSS the backends advertise, see the README's DSR section";
    RefusingAvoided, REFUSING_AVOIDED = 23, "refusing_avoided", Reason, "A new connection's SYN went to another backend (next ring slots, else a backup) because its choice had answered a SYN with an RST within the last second and no check has passed since";
    CookiesSent, COOKIES_SENT = 24, "cookies_sent", Reason, "SYN to a NAT service answered from XDP with a SYN-ACK carrying a SYN cookie (syn_cookies on, or auto under a flood): no state kept";
    CookieValid, COOKIE_VALID = 25, "cookie_valid", Reason, "Client ACK without a connection whose acknowledgment is a valid SYN cookie: the connection was set up and turned into the SYN toward the backend";
    CookieInvalid, COOKIE_INVALID = 26, "cookie_invalid", Reason, "Client ACK without a connection whose acknowledgment is no valid SYN cookie: answered with an RST (no_conntrack), no state";
    CookieSynResent, COOKIE_SYN_RESENT = 27, "cookie_syn_resent", Reason, "Client packet of a SYN-cookie connection whose backend has not answered yet: sent to the backend as its SYN again instead (the client retransmits its data)";
    SynCookies, SYN_COOKIES = 28, "syn_cookies", State, "1 while SYNs to NAT services are answered with SYN cookies ([xdp] syn_cookies = \"on\", or \"auto\" during a SYN flood), else 0";
    StaleAnswer, STALE_ANSWER = 29, "stale_answer", Reason, "A backend answered a new connection's SYN with a bare ACK of an old connection (TIME_WAIT on the SNAT 4-tuple) and no SYN-ACK to any SYN since it left: its listener is gone. Made an RST to the client, which fails at once; from the second in a row the backend is marked refusing";
    StaleCollision, STALE_COLLISION = 30, "stale_collision", Reason, "A backend answered a new connection's SYN with a bare ACK of a connection it still holds on the SNAT 4-tuple (it answered other SYNs since, the port's last flow was half-open, or the SYN had no timestamp): forwarded to the client, which resets it and retransmits its SYN; for a SYN-cookie flow (whose client is connected already) the LB resets that connection itself, an RST to the backend, and its SYN goes again with the client's next packet";
    SynIpOptions, SYN_IP_OPTIONS = 31, "syn_ip_options", Reason, "SYN to a NAT service whose IPv4 header carries options while SYN cookies are on: dropped (the SYN proxy answers headers without options, and a real client's SYN has none; such SYNs would otherwise open flows past the cookies)";
    RstNotTaken, RST_NOT_TAKEN = 32, "rst_not_taken", Reason, "RST of an established connection at a sequence number where neither endpoint's stack takes one (not exactly the next its sender has sent or what its receiver acknowledged, nor one below either): forwarded for the endpoint to judge, and the flow stays open (a blind attacker's RST, or one that crossed later data)";
}

/// [`global_counter::NAMES`]; fails the build unless the indices are `0..COUNT`, each once.
const fn names_by_index() -> [&'static str; COUNT] {
    let mut names = [""; COUNT];
    let mut i = 0;
    while i < COUNT {
        let c = XdpCounter::ALL[i];
        assert!((c as usize) < COUNT, "an XDP counter index is out of range");
        assert!(names[c as usize].is_empty(), "two XDP counters share an index");
        names[c as usize] = c.name();
        i += 1;
    }
    names
}

impl XdpCounter {
    /// The counter counted at `index` of the map.
    pub const fn from_index(index: u32) -> Option<XdpCounter> {
        let mut i = 0;
        while i < COUNT {
            if XdpCounter::ALL[i] as u32 == index {
                return Some(XdpCounter::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// The counter named `name`.
    pub fn from_name(name: &str) -> Option<XdpCounter> {
        XdpCounter::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// A value for each XDP counter (packets, summed over CPUs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpCounters {
    values: [u64; COUNT],
}

impl Default for XdpCounters {
    fn default() -> Self {
        XdpCounters { values: [0; COUNT] }
    }
}

impl XdpCounters {
    pub const fn get(&self, counter: XdpCounter) -> u64 {
        self.values[counter as usize]
    }

    pub const fn set(&mut self, counter: XdpCounter, value: u64) {
        self.values[counter as usize] = value;
    }

    /// Every counter with its value, in the order the surfaces show them.
    pub fn iter(&self) -> impl Iterator<Item = (XdpCounter, u64)> + '_ {
        XdpCounter::ALL.into_iter().map(|c| (c, self.get(c)))
    }

    /// The counters of one kind with their values, in the order the surfaces show them.
    pub fn of_kind(&self, kind: CounterKind) -> impl Iterator<Item = (XdpCounter, u64)> + '_ {
        self.iter().filter(move |(c, _)| c.kind() == kind)
    }

    /// From `(name, value)` pairs; names of no counter are skipped, missing counters are 0.
    pub fn from_named<'a>(pairs: impl IntoIterator<Item = (&'a str, u64)>) -> XdpCounters {
        let mut out = XdpCounters::default();
        for (name, value) in pairs {
            if let Some(c) = XdpCounter::from_name(name) {
                out.set(c, value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_names_and_kinds_agree() {
        for (i, name) in global_counter::NAMES.iter().enumerate() {
            let c = XdpCounter::from_index(i as u32).unwrap();
            assert_eq!(c.name(), *name);
            assert_eq!(XdpCounter::from_name(name), Some(c));
            assert!(!c.help().is_empty() && !c.help().ends_with('.'), "{name}");
        }
        assert_eq!(XdpCounter::from_index(global_counter::COUNT), None);
        assert_eq!(global_counter::NAMES[global_counter::DROPPED as usize], "dropped");
        let verdicts = XdpCounter::ALL
            .iter()
            .filter(|c| c.kind() == CounterKind::Verdict);
        assert_eq!(verdicts.count(), 3);
    }

    #[test]
    fn values_are_kept_by_counter() {
        let c = XdpCounters::from_named([("dropped", 5), ("nonsense", 9), ("no_backend", 4)]);
        assert_eq!(c.get(XdpCounter::Dropped), 5);
        assert_eq!(c.get(XdpCounter::NoBackend), 4);
        assert_eq!(c.get(XdpCounter::Passed), 0);
        let mut reasons = c.of_kind(CounterKind::Reason).filter(|(_, v)| *v > 0);
        assert_eq!(reasons.next(), Some((XdpCounter::NoBackend, 4)));
        assert_eq!(reasons.next(), None);
    }
}
