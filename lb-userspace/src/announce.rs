//! VIP announcement for a routing daemon (`[announce]`): while `lb run` runs, each service VIP
//! with a backend that takes new clients and has passed a check ([`serving`]) has a host route in
//! a kernel table of lb's, which BIRD (its `kernel` protocol with `learn`) imports and exports
//! over BGP; the route goes when that stops being true, and all of them go when the daemon stops. `lb withdraw` removes them after a
//! crash (the packaged unit's `ExecStopPost`).
//!
//! - this file: which VIPs a snapshot announces ([`wanted`]), the [`Announcer`] that keeps the table
//!   in line with them, and [`withdraw`] for `lb withdraw`.
//! - `announce/netlink.rs`: the routes themselves, over rtnetlink.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Mutex;

use tracing::{info, warn};

use crate::config::{AnnounceConfig, HealthKind};
use crate::runtime::Snapshot;
use crate::state::{Backend, Service};

use crate::netlink;

pub use netlink::{NetlinkError, RouteTable};

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The backends of a service that take new clients now: the active, healthy primaries with a
/// weight, or (no primary being one) such backups; its Maglev ring is made of exactly those.
pub fn taking_new_clients(service: &Service) -> impl Iterator<Item = &Backend> {
    service
        .backends
        .iter()
        .filter(|b| b.admits_new() && b.config.backup == service.ring_uses_backups)
}

/// Whether a backend has passed a health check since lb started (always, for a service without
/// checks). Health is "up" until the checks say otherwise, so a node that has just started does
/// not announce, and keepalived does not pick it, before a check has found a backend up.
pub fn checked(snapshot: &Snapshot, service: &Service, backend: &Backend) -> bool {
    if service.settings.health.kind == HealthKind::None {
        return true;
    }
    let check = snapshot.runtime(service, backend);
    let c = check.check.lock().unwrap();
    c.checks > c.failed_checks
}

/// Whether a service has a backend that takes new clients ([`taking_new_clients`]) and has
/// passed a health check ([`checked`]): what `lb check` answers and what keeps its VIP announced.
pub fn serving(snapshot: &Snapshot, service: &Service) -> bool {
    taking_new_clients(service).any(|b| checked(snapshot, service, b))
}

/// Whether a service's listen address can be announced: a specific address, not a wildcard, a
/// loopback or a link-local one.
pub fn announceable(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    !ip.is_unspecified()
        && !ip.is_loopback()
        && match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        }
}

/// The VIPs a snapshot announces: the listen address of every [`serving`] service. A VIP shared
/// by several services (ports) is announced while any of them is serving.
pub fn wanted(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    snapshot
        .state
        .services
        .values()
        .map(|s| (s.settings.listen.ip().to_canonical(), s))
        .filter(|(ip, s)| announceable(*ip) && serving(snapshot, s))
        .map(|(ip, _)| ip)
        .collect()
}

/// Keeps lb's routes in the `[announce]` table equal to [`wanted`] of the state it is shown.
pub struct Announcer {
    at: RouteTable,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Opened on first use and again after an error.
    routes: Option<netlink::Rtnetlink>,
    /// What the table held after the last successful pass.
    announced: BTreeSet<IpAddr>,
    /// Set by [`Announcer::withdraw_all`]: nothing is announced any more.
    stopped: bool,
    /// The last pass failed (logged once as a warning until a pass succeeds again).
    failing: bool,
}

impl Announcer {
    pub fn new(config: &AnnounceConfig) -> Announcer {
        Announcer {
            at: RouteTable {
                table: config.table,
                protocol: config.protocol,
            },
            inner: Mutex::new(Inner {
                routes: None,
                announced: BTreeSet::new(),
                stopped: false,
                failing: false,
            }),
        }
    }

    /// Adds the missing routes of the snapshot's VIPs and deletes lb's other routes in the table
    /// (left by an earlier run, or of VIPs whose services serve no longer). A failure is logged
    /// and tried again on the next call (every change, and every second from the daemon).
    pub fn follow(&self, snapshot: &Snapshot) {
        let mut inner = self.inner.lock().unwrap();
        if inner.stopped {
            return;
        }
        let want = wanted(snapshot);
        match self.reconcile(&mut inner, &want) {
            Ok(()) if inner.failing => {
                inner.failing = false;
                info!(table = self.at.table, "announce: routes in line again");
            }
            Ok(()) => {}
            Err(e) => {
                inner.routes = None;
                if inner.failing {
                    tracing::debug!(error = %e, table = self.at.table, "announce: routes still not in line");
                } else {
                    inner.failing = true;
                    warn!(error = %e, table = self.at.table, "announce: routes not brought in line; retried every second");
                }
            }
        }
    }

    /// Withdraws every VIP at once (the daemon is stopping); later [`Announcer::follow`] calls do
    /// nothing.
    pub fn withdraw_all(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.stopped = true;
        if let Err(e) = self.reconcile(&mut inner, &BTreeSet::new()) {
            warn!(error = %e, table = self.at.table, "announce: routes not withdrawn; `lb withdraw` removes them");
        }
    }

    /// Whether `ip` was announced after the last pass.
    pub fn is_announced(&self, ip: IpAddr) -> bool {
        self.inner.lock().unwrap().announced.contains(&ip.to_canonical())
    }

    fn reconcile(&self, inner: &mut Inner, want: &BTreeSet<IpAddr>) -> Result<(), NetlinkError> {
        if inner.routes.is_none() {
            inner.routes = Some(netlink::Rtnetlink::open()?);
        }
        let routes = inner.routes.as_mut().expect("opened above");
        let have: BTreeSet<IpAddr> = routes.list(self.at)?.into_iter().collect();
        for ip in want.difference(&have) {
            routes.add(self.at, *ip)?;
            info!(vip = %ip, table = self.at.table, "announce: VIP route added");
        }
        for ip in have.difference(want) {
            routes.delete(self.at, *ip)?;
            info!(vip = %ip, table = self.at.table, "announce: VIP route withdrawn");
        }
        inner.announced.clone_from(want);
        Ok(())
    }
}

/// `lb withdraw`: deletes every route of lb's protocol in the `[announce]` table; returns the
/// VIPs withdrawn.
pub fn withdraw(config: &AnnounceConfig) -> Result<Vec<IpAddr>, AnnounceError> {
    let at = RouteTable {
        table: config.table,
        protocol: config.protocol,
    };
    let mut routes = netlink::Rtnetlink::open()?;
    let have = routes.list(at)?;
    for ip in &have {
        routes.delete(at, *ip)?;
    }
    Ok(have)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{backend, service};
    use crate::state::{Command, Health, State};
    use std::time::Duration;

    /// Every backend of every service has passed one check.
    fn all_checked(state: &State) -> Snapshot {
        let snap = Snapshot::new(state.clone());
        for s in snap.state.services.values() {
            for b in &s.backends {
                let ok: Result<Duration, String> = Ok(Duration::from_millis(1));
                snap.runtime(s, b).check.lock().unwrap().record(&ok, 2, 3);
            }
        }
        snap
    }

    #[test]
    fn a_vip_is_wanted_while_one_of_its_services_takes_new_clients() {
        let mut state = State::new(0, 1009);
        for (name, listen) in [
            ("web", "10.0.0.100:80"),
            ("echo", "10.0.0.100:7"),
            ("api", "10.0.0.101:80"),
            ("any", "0.0.0.0:81"),
            ("local", "127.0.0.1:82"),
        ] {
            state
                .apply(Command::AddService {
                    service: service(name, listen, vec![backend("b1", &format!("10.0.1.1:{}", 80))]),
                })
                .unwrap();
        }
        let ips = |s: &State| {
            wanted(&all_checked(s))
                .into_iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(ips(&state), ["10.0.0.100", "10.0.0.101"]);
        let down = |svc: &str| Command::SetHealth {
            service: svc.into(),
            backend: "b1".into(),
            health: Health::Down,
        };
        state.apply(down("api")).unwrap();
        assert_eq!(ips(&state), ["10.0.0.100"]);
        state.apply(down("web")).unwrap();
        assert_eq!(ips(&state), ["10.0.0.100"], "echo still serves the VIP");
        state
            .apply(Command::SetState {
                service: "echo".into(),
                backend: "b1".into(),
                state: crate::config::AdminState::Drain,
            })
            .unwrap();
        assert!(ips(&state).is_empty(), "a draining backend takes no new clients");
    }

    #[test]
    fn a_backup_taking_over_keeps_the_vip() {
        let mut state = State::new(0, 1009);
        let mut spare = backend("spare", "10.0.1.2:80");
        spare.backup = true;
        state
            .apply(Command::AddService {
                service: service("web", "10.0.0.100:80", vec![backend("b1", "10.0.1.1:80"), spare]),
            })
            .unwrap();
        let health = |b: &str, h| Command::SetHealth {
            service: "web".into(),
            backend: b.into(),
            health: h,
        };
        state.apply(health("b1", Health::Down)).unwrap();
        assert_eq!(wanted(&all_checked(&state)).len(), 1);
        state.apply(health("spare", Health::Down)).unwrap();
        assert!(wanted(&all_checked(&state)).is_empty());
    }

    #[test]
    fn a_vip_waits_for_a_backend_that_passed_a_check() {
        let mut state = State::new(0, 1009);
        let mut web = service(
            "web",
            "10.0.0.100:80",
            vec![backend("b1", "10.0.1.1:80"), backend("b2", "10.0.1.2:80")],
        );
        web.health.kind = HealthKind::Tcp;
        state.apply(Command::AddService { service: web }).unwrap();
        let snap = Snapshot::new(state.clone());
        assert!(
            wanted(&snap).is_empty(),
            "no check yet: health is up only by default"
        );
        let svc = snap.state.service("web").unwrap();
        let failed: Result<Duration, String> = Err("refused".into());
        snap.runtime(svc, svc.backend("b1").unwrap())
            .check
            .lock()
            .unwrap()
            .record(&failed, 2, 3);
        assert!(wanted(&snap).is_empty(), "a failed check is no proof");
        let ok: Result<Duration, String> = Ok(Duration::from_millis(1));
        snap.runtime(svc, svc.backend("b2").unwrap())
            .check
            .lock()
            .unwrap()
            .record(&ok, 2, 3);
        assert_eq!(wanted(&snap).len(), 1);
        // A later failed probe (still up, fall = 3) keeps it: one success is enough.
        snap.runtime(svc, svc.backend("b2").unwrap())
            .check
            .lock()
            .unwrap()
            .record(&failed, 2, 3);
        assert_eq!(wanted(&snap).len(), 1);
    }
}
