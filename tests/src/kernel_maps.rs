//! [`dump`]: the forwarding content of an `lb` daemon's pinned XDP maps (services, backends, ring,
//! SNAT addresses, conntrack, affinity, global config) as sorted hex lines, to compare before and
//! after a change. Counters and the per-CPU SNAT port cursor are left out: they move with every
//! packet. Read-only: entries are looked up, never written.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::maps::{
    AffinityKey, AffinityValue, BackendValue, FlowKey, FlowValue, GlobalConfig, MAP_AFFINITY, MAP_BACKENDS,
    MAP_CONFIG, MAP_CONNTRACK, MAP_RING, MAP_SERVICES, MAP_SNAT_ADDRS, ServiceKey, ServiceValue,
};

#[derive(Debug, thiserror::Error)]
pub enum KernelMapsError {
    #[error("pinned map {path}: {message}")]
    Map { path: String, message: String },
}

fn open(dir: &Path, name: &str) -> Result<Map, KernelMapsError> {
    let path = dir.join(name);
    let err = |e: aya::maps::MapError| KernelMapsError::Map {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    Map::from_map_data(MapData::from_pin(&path).map_err(err)?).map_err(err)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn hash<const K: usize, const V: usize>(dir: &Path, name: &str) -> Result<Vec<String>, KernelMapsError> {
    let err = |e: aya::maps::MapError| KernelMapsError::Map {
        path: dir.join(name).display().to_string(),
        message: e.to_string(),
    };
    let map: HashMap<MapData, [u8; K], [u8; V]> = HashMap::try_from(open(dir, name)?).map_err(err)?;
    let mut lines = Vec::new();
    for key in map.keys() {
        let key = key.map_err(err)?;
        // An entry may go away between the key walk and the lookup (LRU eviction): skip it.
        if let Ok(value) = map.get(&key, 0) {
            lines.push(format!("{} = {}", hex(&key), hex(&value)));
        }
    }
    lines.sort();
    Ok(lines)
}

/// The non-zero entries of an array, as `index = value`.
fn array<const V: usize>(dir: &Path, name: &str) -> Result<Vec<String>, KernelMapsError> {
    let err = |e: aya::maps::MapError| KernelMapsError::Map {
        path: dir.join(name).display().to_string(),
        message: e.to_string(),
    };
    let map: Array<MapData, [u8; V]> = Array::try_from(open(dir, name)?).map_err(err)?;
    let mut lines = Vec::new();
    for i in 0..map.len() {
        let value = map.get(&i, 0).map_err(err)?;
        if value.iter().any(|b| *b != 0) {
            lines.push(format!("{i} = {}", hex(&value)));
        }
    }
    Ok(lines)
}

/// The forwarding maps pinned under `dir`, by map name.
pub fn dump(dir: &Path) -> Result<BTreeMap<&'static str, Vec<String>>, KernelMapsError> {
    let mut out = BTreeMap::new();
    out.insert(
        MAP_SERVICES,
        hash::<{ size_of::<ServiceKey>() }, { size_of::<ServiceValue>() }>(dir, MAP_SERVICES)?,
    );
    out.insert(
        MAP_BACKENDS,
        array::<{ size_of::<BackendValue>() }>(dir, MAP_BACKENDS)?,
    );
    out.insert(MAP_RING, array::<4>(dir, MAP_RING)?);
    out.insert(MAP_SNAT_ADDRS, hash::<4, 4>(dir, MAP_SNAT_ADDRS)?);
    out.insert(
        MAP_CONNTRACK,
        hash::<{ size_of::<FlowKey>() }, { size_of::<FlowValue>() }>(dir, MAP_CONNTRACK)?,
    );
    out.insert(
        MAP_AFFINITY,
        hash::<{ size_of::<AffinityKey>() }, { size_of::<AffinityValue>() }>(dir, MAP_AFFINITY)?,
    );
    out.insert(
        MAP_CONFIG,
        array::<{ size_of::<GlobalConfig>() }>(dir, MAP_CONFIG)?,
    );
    Ok(out)
}

/// The global config pinned under `dir`.
pub fn global_config(dir: &Path) -> Result<GlobalConfig, KernelMapsError> {
    let err = |e: aya::maps::MapError| KernelMapsError::Map {
        path: dir.join(MAP_CONFIG).display().to_string(),
        message: e.to_string(),
    };
    let map: Array<MapData, GlobalConfig> = Array::try_from(open(dir, MAP_CONFIG)?).map_err(err)?;
    map.get(&0, 0).map_err(err)
}
