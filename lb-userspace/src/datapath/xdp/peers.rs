//! `[xdp] redirect_peer`: the veth ends of this network namespace whose other end lives in another
//! namespace, kept in the program's [`MAP_PEER_IFACES`] (at the TC hook, a NAT flow's packet for
//! one goes straight into the other namespace's stack; see `lb-ebpf`'s `Frame::redirect_into`).
//! Read from the kernel at start and every [`REFRESH`] after: a veth made later (a container
//! started) joins, a removed one leaves; until then it forwards the ordinary way. Emptied when
//! the daemon stops (its pinned links keep forwarding, without the shortcut, since nobody keeps
//! the list current then).

use std::collections::HashSet;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use lb_common::maps::{MAP_PEER_IFACES, MAX_PEER_IFACES};
use tracing::{debug, info, warn};

use super::{XdpError, map_err, take};

/// How often the set of veth ends is read again.
const REFRESH: Duration = Duration::from_secs(2);

/// The program's map of veth ends.
pub(super) struct PeerIfaces {
    map: HashMap<MapData, u32, u8>,
    /// What the map holds.
    held: HashSet<u32>,
    /// Whether reading the interfaces failed last time (said once, not every refresh).
    failing: bool,
}

impl PeerIfaces {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<PeerIfaces, XdpError> {
        Ok(PeerIfaces {
            map: take(ebpf, MAP_PEER_IFACES)?,
            held: HashSet::new(),
            failing: false,
        })
    }

    /// Fills the map now and, inside a tokio runtime, keeps it current from a task of its own.
    pub(super) fn keep(mut self) {
        self.refresh();
        let veths = self.held.len();
        info!(
            veths,
            "[xdp] redirect_peer: packets for a veth whose other end is in another network namespace go \
             straight into it (redirect_peer = false turns this off)"
        );
        if tokio::runtime::Handle::try_current().is_err() {
            // No task to keep the list current: it stays as read (dropping it would empty it).
            std::mem::forget(self);
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.refresh();
            }
        });
    }

    /// Reads the veth ends again and brings the map to them; on a failure the map stays as it
    /// was (a veth listed that is gone meanwhile is never a next hop).
    fn refresh(&mut self) {
        let found = crate::netlink::Rtnetlink::open().and_then(|mut rtnl| rtnl.veths_to_other_namespaces());
        match found {
            Ok(found) => {
                if std::mem::take(&mut self.failing) {
                    info!("[xdp] redirect_peer: the interfaces can be read again");
                }
                if let Err(e) = self.set(found.into_iter().take(MAX_PEER_IFACES as usize).collect()) {
                    warn!(error = %e, "[xdp] redirect_peer: updating the map of veth ends failed");
                }
            }
            Err(e) if !self.failing => {
                self.failing = true;
                warn!(error = %e, "[xdp] redirect_peer: cannot read the interfaces; the veth ends known stay as they are");
            }
            Err(_) => {}
        }
    }

    /// Makes the map hold exactly `want`.
    fn set(&mut self, want: HashSet<u32>) -> Result<(), XdpError> {
        for gone in self.held.difference(&want).copied().collect::<Vec<_>>() {
            self.map.remove(&gone).map_err(map_err(MAP_PEER_IFACES))?;
            self.held.remove(&gone);
            debug!(ifindex = gone, "[xdp] redirect_peer: veth end gone");
        }
        for new in want.difference(&self.held).copied().collect::<Vec<_>>() {
            self.map.insert(new, 1, 0).map_err(map_err(MAP_PEER_IFACES))?;
            self.held.insert(new);
            debug!(ifindex = new, "[xdp] redirect_peer: veth end added");
        }
        Ok(())
    }
}

impl Drop for PeerIfaces {
    fn drop(&mut self) {
        let _ = self.set(HashSet::new());
    }
}
