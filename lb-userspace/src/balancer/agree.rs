//! Property test: the shared selection ([`lb_common::select`]) over the user-space tables of
//! [`Balancer`] and over kernel-shaped tables (a backends array indexed by kernel index with
//! flags, a flat ring of kernel indices, an affinity map keyed by service slot and client, times
//! in nanoseconds) picks the same backend for every client through random sequences of
//! connections, state, health and weight changes, failbacks (home backends back, ring leaving the
//! backups) and the passing of time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use lb_common::maps::{
    AffinityKey, AffinityValue, BACKEND_ADMITS_KNOWN, BACKEND_PRESENT, BackendValue, NO_BACKEND,
};
use lb_common::select::{self, AffinitySlot, BackendTable, Policy, Ring};
use proptest::prelude::*;

use super::Balancer;
use crate::config::AdminState;
use crate::datapath::affinity::Failback;
use crate::state::tests::{backend, service};
use crate::state::{Command, Health, State};

const SLOT: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(600);

/// Kernel index of a state backend id: deliberately not the id, as in the kernel.
fn index(id: u32) -> u32 {
    id * 3 + 5
}

/// The kernel's maps for one service, written from the state as the XDP sync writes them.
#[derive(Default)]
struct Kernel {
    backends: HashMap<u32, BackendValue>,
    ring: Vec<u32>,
    affinity: HashMap<AffinityKey, AffinityValue>,
}

impl Kernel {
    fn sync(&mut self, state: &State) {
        let svc = state.service("web").unwrap();
        self.backends.clear();
        for b in &svc.backends {
            let mut flags = BACKEND_PRESENT;
            if b.admits_known() {
                flags |= BACKEND_ADMITS_KNOWN;
            }
            self.backends.insert(
                index(b.id),
                BackendValue {
                    flags,
                    service_slot: SLOT,
                    ..Default::default()
                },
            );
        }
        self.ring = if svc.ring.is_empty() {
            vec![NO_BACKEND; state.ring_size as usize]
        } else {
            svc.ring.iter().map(|id| index(*id)).collect()
        };
    }

    /// Forgets the entries `failback` sends back to the ring, as the XDP datapath's table does
    /// (its values translated from kernel indices to state ids).
    fn fail_back(&mut self, failback: &Failback) {
        let id = |i: u32| if i == NO_BACKEND { NO_BACKEND } else { (i - 5) / 3 };
        self.affinity.retain(|k, v| {
            let by_id = AffinityValue {
                backend: id(v.backend),
                home: id(v.home),
                ..*v
            };
            !(k.service_slot == SLOT && failback.picks_value(&by_id))
        });
    }
}

struct Slot<'a>(&'a mut HashMap<AffinityKey, AffinityValue>, AffinityKey);

impl AffinitySlot for Slot<'_> {
    fn get(&self) -> Option<AffinityValue> {
        self.0.get(&self.1).copied()
    }
    fn put(&mut self, v: &AffinityValue) {
        self.0.insert(self.1, *v);
    }
}

struct Tables<'a>(&'a HashMap<u32, BackendValue>, &'a [u32]);

impl BackendTable for Tables<'_> {
    fn admits_known(&self, i: u32) -> bool {
        let want = BACKEND_PRESENT | BACKEND_ADMITS_KNOWN;
        self.0
            .get(&i)
            .is_some_and(|b| b.flags & want == want && b.service_slot == SLOT)
    }
}

impl Ring for Tables<'_> {
    fn size(&self) -> u32 {
        self.1.len() as u32
    }
    fn get(&self, slot: u32) -> Option<u32> {
        self.1.get(slot as usize).copied()
    }
}

#[derive(Clone, Debug)]
enum Event {
    Connect(u8),
    State(u8, u8),
    Health(u8, bool),
    Weight(u8, u8),
    Wait(u16),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => any::<u8>().prop_map(|c| Event::Connect(c % 48)),
        1 => (0u8..5, 0u8..3).prop_map(|(b, s)| Event::State(b, s)),
        2 => (0u8..5, any::<bool>()).prop_map(|(b, up)| Event::Health(b, up)),
        1 => (0u8..5, 0u8..4).prop_map(|(b, w)| Event::Weight(b, w)),
        1 => (0u16..900).prop_map(Event::Wait),
    ]
}

fn run(events: &[Event], failback: bool) -> Result<(), TestCaseError> {
    let mut settings = service(
        "web",
        "10.0.0.100:80",
        (0..4)
            .map(|i| backend(&format!("b{i}"), &format!("10.1.{i}.2:80")))
            .collect(),
    );
    settings.failback = failback;
    let mut spare = backend("spare", "10.1.9.2:80");
    spare.backup = true;
    settings.backends.push(spare);
    let mut state = State::new(7, 101);
    state.apply(Command::AddService { service: settings }).unwrap();
    let user = Balancer::new(state);
    let mut kernel = Kernel::default();
    kernel.sync(&user.snapshot().state);
    let start = Instant::now();
    let mut t: u64 = 0;
    let names = ["b0", "b1", "b2", "b3", "spare"];
    for e in events {
        let command = match e {
            Event::Connect(c) => {
                let client = Ipv4Addr::new(192, 0, 2, *c);
                let now = start + Duration::from_nanos(t);
                let by_user = user.choose("web", IpAddr::V4(client), now, &[]).ok();
                if let Some(choice) = &by_user {
                    user.confirm("web", IpAddr::V4(client), choice.chosen(), now);
                }
                let policy = Policy {
                    seed: user.snapshot().state.seed,
                    affinity_timeout_ns: TIMEOUT.as_nanos() as u64,
                };
                let key = AffinityKey {
                    service_slot: SLOT,
                    client_be: u32::from(client).to_be(),
                };
                let tables = Tables(&kernel.backends, &kernel.ring);
                let by_kernel = select::select(
                    &policy,
                    None,
                    u32::from(client),
                    t,
                    &mut Slot(&mut kernel.affinity, key),
                    &tables,
                    &tables,
                    |_| false,
                    1,
                );
                prop_assert_eq!(
                    by_user.map(|c| index(c.backend_id)),
                    by_kernel.map(|c| c.backend),
                    "client {} at t={}ns",
                    client,
                    t
                );
                None
            }
            Event::State(b, s) => Some(Command::SetState {
                service: "web".into(),
                backend: names[*b as usize].into(),
                state: [AdminState::Active, AdminState::Drain, AdminState::Maintenance][*s as usize],
            }),
            Event::Health(b, up) => Some(Command::SetHealth {
                service: "web".into(),
                backend: names[*b as usize].into(),
                health: if *up { Health::Up } else { Health::Down },
            }),
            Event::Weight(b, w) => Some(Command::SetWeight {
                service: "web".into(),
                backend: names[*b as usize].into(),
                weight: u32::from(*w),
            }),
            Event::Wait(secs) => {
                t += u64::from(*secs) * 1_000_000_000;
                None
            }
        };
        if let Some(command) = command {
            let pending = user.stage(command).unwrap();
            let back = pending.failback().cloned();
            prop_assert!(failback || back.is_none(), "failback only when the service asks");
            user.commit(pending);
            kernel.sync(&user.snapshot().state);
            if let Some(back) = back {
                kernel.fail_back(&back);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn user_space_and_kernel_tables_agree(events in prop::collection::vec(event(), 1..200), failback in any::<bool>()) {
        run(&events, failback)?;
    }
}
