//! SYN cookies (`[xdp] syn_cookies`): installs the `lb_synproxy` program in `lb_progs` (where
//! `lb_xdp` tail-calls it; at TC, `lb_synproxy_tc` in `lb_tc_progs` for `lb_tc`), fills `lb_syncookie` with a random secret and the mode, and with
//! "auto" switches cookies on when SYN pressure shows and off after a quiet spell.
//!
//! Pressure, read from the kernel's counters every [`AUTO_POLL`]: a half-open flow gave its SNAT
//! port up to a new SYN (`half_open_reclaimed`), a SYN found no port (`snat_exhausted`) while new
//! flows come at [`FLOOD_SYN_RATE`] a second or more (ports held by established connections are
//! no flood: cookies would not free them), or, while cookies are on, more than
//! [`UNANSWERED_PER_SEC`] cookies a second were not answered by a valid cookie ACK (spoofed SYNs
//! never are). Cookies go off after [`QUIET`] without pressure.

use std::io::Read;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, MapData, ProgramArray};
use aya::programs::{SchedClassifier, Xdp};
use lb_common::counters::XdpCounter;
use lb_common::synproxy::{
    COOKIES_ON, MAP_PROGS, MAP_SYNCOOKIE, MAP_TC_PROGS, PROG_SYNPROXY, SYNPROXY_PROGRAM, SynCookieConfig,
    TC_SYNPROXY_PROGRAM,
};
use tracing::{info, warn};

use crate::config::{Hook, SynCookies};

use super::{Inner, XdpDatapath, XdpError, map_err, take};

/// How often "auto" reads the counters.
pub const AUTO_POLL: Duration = Duration::from_millis(100);
/// Cookies sent and not answered per second, while on, that still count as a flood.
pub const UNANSWERED_PER_SEC: u64 = 200;
/// New flows a second that make SNAT exhaustion count as a flood.
pub const FLOOD_SYN_RATE: u64 = 1000;
/// Time without pressure after which "auto" switches cookies off.
pub const QUIET: Duration = Duration::from_secs(10);

/// The SYN proxy's maps and mode.
pub(super) struct SynProxy {
    config: Array<MapData, SynCookieConfig>,
    /// Kept open: the kernel empties a program array when its last user-space handle closes.
    _progs: ProgramArray<MapData>,
    secret: [u32; 4],
    pub(super) mode: SynCookies,
    /// Whether SYNs are answered with cookies now.
    pub(super) on: bool,
}

fn random_secret() -> Result<[u32; 4], XdpError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| XdpError::System(format!("reading /dev/urandom for the SYN cookie secret: {e}")))?;
    let mut secret = [0u32; 4];
    for (w, c) in secret.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(secret)
}

impl SynProxy {
    /// Takes the maps out of `ebpf`, draws the secret and, unless `mode` is off, loads the SYN
    /// proxy of `hook` (`lb_synproxy`, or `lb_synproxy_tc`) and puts it in the program array its
    /// entry point tail-calls through (`lb_progs`, or `lb_tc_progs`).
    pub(super) fn load(ebpf: &mut Ebpf, mode: SynCookies, hook: Hook) -> Result<SynProxy, XdpError> {
        let config: Array<MapData, SynCookieConfig> = take(ebpf, MAP_SYNCOOKIE)?;
        let (name, array) = match hook {
            Hook::Xdp => (SYNPROXY_PROGRAM, MAP_PROGS),
            Hook::Tc => (TC_SYNPROXY_PROGRAM, MAP_TC_PROGS),
        };
        let mut progs: ProgramArray<MapData> = take(ebpf, array)?;
        if mode != SynCookies::Off {
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| XdpError::System(format!("program {name} missing from the object")))?;
            let fd = match hook {
                Hook::Xdp => {
                    let program: &mut Xdp = program.try_into()?;
                    program.load()?;
                    program.fd()?
                }
                Hook::Tc => {
                    let program: &mut SchedClassifier = program.try_into()?;
                    program.load()?;
                    program.fd()?
                }
            };
            progs.set(PROG_SYNPROXY, fd, 0).map_err(map_err(array))?;
        }
        let mut proxy = SynProxy {
            config,
            _progs: progs,
            secret: random_secret()?,
            mode,
            on: false,
        };
        proxy.set(mode == SynCookies::On)?;
        Ok(proxy)
    }

    /// Switches cookies on or off in the kernel.
    pub(super) fn set(&mut self, on: bool) -> Result<(), XdpError> {
        let value = SynCookieConfig {
            enabled: if on { COOKIES_ON } else { 0 },
            _pad: 0,
            secret: self.secret,
        };
        self.config.set(0, value, 0).map_err(map_err(MAP_SYNCOOKIE))?;
        self.on = on;
        Ok(())
    }
}

/// The counters "auto" decides on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    pub half_open_reclaimed: u64,
    pub snat_exhausted: u64,
    pub cookies_sent: u64,
    pub cookie_valid: u64,
    pub new_flows: u64,
}

/// Why "auto" switched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    On(&'static str),
    Off,
}

/// The "auto" rule, fed the counters at each poll.
#[derive(Debug)]
pub struct Auto {
    last: Option<(Pressure, Instant)>,
    last_pressure: Option<Instant>,
}

impl Default for Auto {
    fn default() -> Self {
        Auto::new()
    }
}

impl Auto {
    pub const fn new() -> Auto {
        Auto {
            last: None,
            last_pressure: None,
        }
    }

    /// The switch to make now, given whether cookies are `on` and the counters `c` at `now`.
    pub fn decide(&mut self, on: bool, c: Pressure, now: Instant) -> Option<Switch> {
        let (prev, at) = self.last.replace((c, now))?;
        let elapsed = now.saturating_duration_since(at);
        let grew = |a: u64, b: u64| a.saturating_sub(b);
        let per_tick = |rate: u64| (rate as f64 * elapsed.as_secs_f64()).max(1.0) as u64;
        let reason = if grew(c.half_open_reclaimed, prev.half_open_reclaimed) > 0 {
            Some("half-open flows are giving their SNAT ports up to new SYNs")
        } else if grew(c.snat_exhausted, prev.snat_exhausted) > 0
            && grew(c.new_flows, prev.new_flows) >= per_tick(FLOOD_SYN_RATE)
        {
            Some("SYNs found no free SNAT port")
        } else {
            let unanswered = grew(c.cookies_sent, prev.cookies_sent)
                .saturating_sub(grew(c.cookie_valid, prev.cookie_valid));
            (unanswered > per_tick(UNANSWERED_PER_SEC))
                .then_some("SYN cookies are not answered (spoofed SYNs)")
        };
        if let Some(reason) = reason {
            self.last_pressure = Some(now);
            return (!on).then_some(Switch::On(reason));
        }
        let quiet = self
            .last_pressure
            .is_none_or(|t| now.saturating_duration_since(t) >= QUIET);
        (on && quiet).then_some(Switch::Off)
    }
}

fn pressure(inner: &Inner) -> Pressure {
    let read = |c: XdpCounter| {
        inner
            .maps
            .global
            .get(&(c as u32), 0)
            .map_or(0, |v| v.iter().map(|x| x.packets).sum())
    };
    Pressure {
        half_open_reclaimed: read(XdpCounter::HalfOpenReclaimed),
        snat_exhausted: read(XdpCounter::SnatExhausted),
        cookies_sent: read(XdpCounter::CookiesSent),
        cookie_valid: read(XdpCounter::CookieValid),
        new_flows: read(XdpCounter::NewFlows),
    }
}

impl XdpDatapath {
    /// With `syn_cookies = "auto"`: starts the task that switches cookies (needs a tokio runtime;
    /// without one nothing is started). It ends when the datapath is dropped.
    pub(super) fn watch_syn_pressure(inner: &Arc<Mutex<Inner>>) {
        if tokio::runtime::Handle::try_current().is_err()
            || inner.lock().unwrap().synproxy.mode != SynCookies::Auto
        {
            return;
        }
        let inner: Weak<Mutex<Inner>> = Arc::downgrade(inner);
        tokio::spawn(async move {
            let mut auto = Auto::new();
            let mut tick = tokio::time::interval(AUTO_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = inner.upgrade() else { return };
                let mut inner = inner.lock().unwrap();
                let c = pressure(&inner);
                let Some(switch) = auto.decide(inner.synproxy.on, c, Instant::now()) else {
                    continue;
                };
                let on = matches!(switch, Switch::On(_));
                if let Err(e) = inner.synproxy.set(on) {
                    warn!(error = %crate::report::chain(&e), "cannot switch SYN cookies");
                    continue;
                }
                // At most two lines per QUIET: "off" needs that long without pressure.
                match switch {
                    Switch::On(reason) => warn!(
                        reason,
                        "SYN flood: SYN cookies on for xdp NAT services (no state until a client's ACK proves its address)"
                    ),
                    Switch::Off => info!(
                        quiet_secs = QUIET.as_secs(),
                        "SYN cookies off: no SYN pressure for a while"
                    ),
                }
            }
        });
    }

    /// Whether SYN cookies are on now.
    pub fn syn_cookies_on(&self) -> bool {
        self.inner.lock().unwrap().synproxy.on
    }

    /// Switches SYN cookies on or off now, as "auto" does (which may switch them back).
    pub fn set_syn_cookies(&self, on: bool) -> Result<(), XdpError> {
        self.inner.lock().unwrap().synproxy.set(on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(reclaimed: u64, exhausted: u64, sent: u64, valid: u64) -> Pressure {
        Pressure {
            half_open_reclaimed: reclaimed,
            snat_exhausted: exhausted,
            cookies_sent: sent,
            cookie_valid: valid,
            new_flows: 0,
        }
    }

    #[test]
    fn reclaims_switch_on_and_quiet_switches_off() {
        let mut a = Auto::new();
        let t0 = Instant::now();
        let tick = |i: u64| t0 + AUTO_POLL * i as u32;
        assert_eq!(a.decide(false, p(0, 0, 0, 0), tick(0)), None);
        assert_eq!(a.decide(false, p(0, 0, 0, 0), tick(1)), None);
        assert!(matches!(
            a.decide(false, p(5, 0, 0, 0), tick(2)),
            Some(Switch::On(_))
        ));
        // While on, unanswered cookies keep it on.
        let mut sent = 0;
        for i in 3..200 {
            sent += 10_000;
            assert_eq!(a.decide(true, p(5, 0, sent, 0), tick(i)), None, "tick {i}");
        }
        // Answered cookies (real clients) are no pressure: off after QUIET.
        let mut valid = 0;
        let mut switched = None;
        for i in 200..400 {
            sent += 50;
            valid += 50;
            if let Some(s) = a.decide(true, p(5, 0, sent, valid), tick(i)) {
                switched = Some((s, i));
                break;
            }
        }
        let (s, i) = switched.expect("switched off");
        assert_eq!(s, Switch::Off);
        assert_eq!(tick(i) - tick(199), QUIET);
    }

    #[test]
    fn snat_exhaustion_under_a_syn_rush_switches_on_and_nothing_else_does() {
        let mut a = Auto::new();
        let t0 = Instant::now();
        let flows = |n: u64, c: Pressure| Pressure { new_flows: n, ..c };
        assert_eq!(a.decide(false, p(0, 0, 0, 0), t0), None);
        // Busy but healthy: many new flows, nothing reclaimed or exhausted.
        assert_eq!(
            a.decide(false, flows(50_000, p(0, 0, 0, 0)), t0 + AUTO_POLL),
            None
        );
        // Ports exhausted by a few long connections: no flood, cookies would not help.
        assert_eq!(
            a.decide(false, flows(50_010, p(0, 3, 0, 0)), t0 + AUTO_POLL * 2),
            None
        );
        // Exhausted while SYNs pour in: on.
        assert!(matches!(
            a.decide(false, flows(60_000, p(0, 4, 0, 0)), t0 + AUTO_POLL * 3),
            Some(Switch::On(_))
        ));
        // Already on: no second switch.
        assert_eq!(
            a.decide(true, flows(70_000, p(0, 9, 0, 0)), t0 + AUTO_POLL * 4),
            None
        );
    }
}
