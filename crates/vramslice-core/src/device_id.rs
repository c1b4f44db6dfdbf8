//! Device IDs the plugin advertises: `<GPU UUID>::<k>`, one per unit. The ID alone tells which
//! GPU a unit belongs to, so Allocate can derive the GPU and the limit from the IDs it is given.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

const SEPARATOR: &str = "::";

/// One advertised unit of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    /// The GPU's UUID as NVML reports it (`GPU-...`).
    pub gpu_uuid: String,
    /// The unit's index on that GPU, `0 .. units-1`.
    pub unit: u64,
}

/// A device ID, or a set of them, that cannot be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// Not of the form `<uuid>::<k>`.
    #[error("device ID {0:?} is malformed: expected <GPU UUID>::<unit index>")]
    Malformed(String),
    /// The UUID part is not a usable GPU UUID.
    #[error(
        "device ID {0:?} has an invalid GPU UUID: it must be non-empty and contain no whitespace or '::'"
    )]
    BadUuid(String),
    /// An allocation request with no IDs.
    #[error("no device IDs in the request")]
    Empty,
    /// The IDs name units of more than one GPU; a container gets exactly one GPU.
    #[error("device IDs span more than one GPU ({}): a container's VRAM must come from one GPU", .0.join(", "))]
    MixedGpus(Vec<String>),
    /// The IDs span several GPUs but not in equal shares, the one shape a container's limits can
    /// be mapped from (`vramslice.io/gpus` splits a pod's units evenly).
    #[error("IDs span {}: vramslice maps several GPUs only as equal shares", unit_list(.0))]
    UnevenSpan(Vec<(String, usize)>),
    /// The IDs span more GPUs than one container may hold.
    #[error("IDs span {0} GPUs; a container may hold units of at most {max} GPUs", max = crate::cluster::placement::MAX_GPUS_PER_POD)]
    TooManyGpus(usize),
    /// The same unit appears twice.
    #[error("device ID {0} appears more than once in the request")]
    Duplicate(String),
}

impl DeviceId {
    /// The ID of unit `unit` of GPU `gpu_uuid`.
    pub fn new(gpu_uuid: impl Into<String>, unit: u64) -> Self {
        DeviceId {
            gpu_uuid: gpu_uuid.into(),
            unit,
        }
    }

    /// Whether a string may be used as the GPU part of an ID.
    pub fn valid_uuid(uuid: &str) -> bool {
        !uuid.is_empty() && !uuid.contains(SEPARATOR) && !uuid.chars().any(char::is_whitespace)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{SEPARATOR}{}", self.gpu_uuid, self.unit)
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (uuid, unit) = s
            .rsplit_once(SEPARATOR)
            .ok_or_else(|| DeviceIdError::Malformed(s.to_string()))?;
        if unit.is_empty() || !unit.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DeviceIdError::Malformed(s.to_string()));
        }
        let unit = unit
            .parse()
            .map_err(|_| DeviceIdError::Malformed(s.to_string()))?;
        if !DeviceId::valid_uuid(uuid) {
            return Err(DeviceIdError::BadUuid(s.to_string()));
        }
        Ok(DeviceId::new(uuid, unit))
    }
}

/// `GPU-a (3 units) and GPU-b (1 unit)`, or `GPU-a (2 units), GPU-b (2 units) and GPU-c (1 unit)`.
fn unit_list(gpus: &[(String, usize)]) -> String {
    let item = |(uuid, n): &(String, usize)| {
        format!("{uuid} ({n} unit{})", if *n == 1 { "" } else { "s" })
    };
    match gpus {
        [] => String::new(),
        [one] => item(one),
        [rest @ .., last] => format!(
            "{} and {}",
            rest.iter().map(item).collect::<Vec<_>>().join(", "),
            item(last)
        ),
    }
}

/// The units of each GPU that `ids` name, in the order given: every ID well-formed, none twice,
/// at least one.
fn units_by_gpu<S: AsRef<str>>(ids: &[S]) -> Result<BTreeMap<String, Vec<u64>>, DeviceIdError> {
    if ids.is_empty() {
        return Err(DeviceIdError::Empty);
    }
    let mut by_gpu: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for raw in ids {
        let id: DeviceId = raw.as_ref().parse()?;
        let units = by_gpu.entry(id.gpu_uuid.clone()).or_default();
        if units.contains(&id.unit) {
            return Err(DeviceIdError::Duplicate(id.to_string()));
        }
        units.push(id.unit);
    }
    Ok(by_gpu)
}

/// What a set of device IDs hands a container: one GPU and a number of its units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSelection {
    /// The one GPU all IDs belong to.
    pub gpu_uuid: String,
    /// The unit indices, sorted.
    pub units: Vec<u64>,
}

impl GpuSelection {
    /// Parse and check the IDs of one container's request: all well-formed, no duplicates, all of
    /// one GPU. Whether the GPU and units exist is the inventory's question.
    pub fn from_ids<S: AsRef<str>>(ids: &[S]) -> Result<GpuSelection, DeviceIdError> {
        let by_gpu = units_by_gpu(ids)?;
        if by_gpu.len() > 1 {
            return Err(DeviceIdError::MixedGpus(by_gpu.into_keys().collect()));
        }
        let (gpu_uuid, mut units) = by_gpu.into_iter().next().ok_or(DeviceIdError::Empty)?;
        units.sort_unstable();
        Ok(GpuSelection { gpu_uuid, units })
    }

    /// Number of units selected.
    pub fn unit_count(&self) -> u64 {
        self.units.len() as u64
    }

    /// Parse and check the IDs of one container's request that may span several GPUs: all
    /// well-formed, no duplicates, and either one GPU or an equal number of units from each of
    /// 2..=[`MAX_GPUS_PER_POD`](crate::cluster::placement::MAX_GPUS_PER_POD) GPUs (the shape
    /// `vramslice.io/gpus` asks for; any other is [`DeviceIdError::UnevenSpan`]). One selection
    /// per GPU, by UUID; [`GpuSelection::from_ids`] is the one-GPU case.
    pub fn spanning<S: AsRef<str>>(ids: &[S]) -> Result<Vec<GpuSelection>, DeviceIdError> {
        let by_gpu = units_by_gpu(ids)?;
        let counts: Vec<(String, usize)> =
            by_gpu.iter().map(|(g, u)| (g.clone(), u.len())).collect();
        if counts.windows(2).any(|w| w[0].1 != w[1].1) {
            return Err(DeviceIdError::UnevenSpan(counts));
        }
        if by_gpu.len() > crate::cluster::placement::MAX_GPUS_PER_POD as usize {
            return Err(DeviceIdError::TooManyGpus(by_gpu.len()));
        }
        Ok(by_gpu
            .into_iter()
            .map(|(gpu_uuid, mut units)| {
                units.sort_unstable();
                GpuSelection { gpu_uuid, units }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_as_the_contract_says() {
        let id = DeviceId::new("GPU-0a1b", 7);
        assert_eq!(id.to_string(), "GPU-0a1b::7");
        assert_eq!("GPU-0a1b::7".parse::<DeviceId>(), Ok(id));
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "GPU-1",
            "GPU-1::",
            "::3",
            "GPU-1::x",
            "GPU-1::-1",
            "GPU 1::2",
            "GPU-1::+2",
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn selection_needs_one_gpu() {
        let sel = GpuSelection::from_ids(&["GPU-a::3", "GPU-a::1"]).unwrap();
        assert_eq!(sel.gpu_uuid, "GPU-a");
        assert_eq!(sel.units, vec![1, 3]);
        let err = GpuSelection::from_ids(&["GPU-a::0", "GPU-b::0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device IDs span more than one GPU (GPU-a, GPU-b): a container's VRAM must come from one GPU"
        );
        assert!(matches!(
            GpuSelection::from_ids(&["GPU-a::0", "GPU-a::0"]),
            Err(DeviceIdError::Duplicate(_))
        ));
        assert_eq!(
            GpuSelection::from_ids::<&str>(&[]),
            Err(DeviceIdError::Empty)
        );
    }

    #[test]
    fn spanning_selections_take_equal_shares_only() {
        let sel =
            GpuSelection::spanning(&["GPU-b::0", "GPU-a::3", "GPU-b::5", "GPU-a::1"]).unwrap();
        assert_eq!(sel.len(), 2);
        assert_eq!(
            (sel[0].gpu_uuid.as_str(), sel[0].units.clone()),
            ("GPU-a", vec![1, 3])
        );
        assert_eq!(
            (sel[1].gpu_uuid.as_str(), sel[1].units.clone()),
            ("GPU-b", vec![0, 5])
        );
        // One GPU is the one-GPU selection.
        assert_eq!(
            GpuSelection::spanning(&["GPU-a::2", "GPU-a::0"]).unwrap(),
            vec![GpuSelection::from_ids(&["GPU-a::2", "GPU-a::0"]).unwrap()]
        );
        let err =
            GpuSelection::spanning(&["GPU-a::0", "GPU-a::1", "GPU-a::2", "GPU-b::0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IDs span GPU-a (3 units) and GPU-b (1 unit): vramslice maps several GPUs only as equal shares"
        );
        let err =
            GpuSelection::spanning(&["GPU-a::0", "GPU-b::0", "GPU-c::0", "GPU-c::1"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IDs span GPU-a (1 unit), GPU-b (1 unit) and GPU-c (2 units): vramslice maps several GPUs only as equal shares"
        );
        let nine: Vec<String> = (0..9).map(|g| format!("GPU-{g}::0")).collect();
        assert_eq!(
            GpuSelection::spanning(&nine),
            Err(DeviceIdError::TooManyGpus(9))
        );
        assert!(matches!(
            GpuSelection::spanning(&["GPU-a::0", "GPU-b::0", "GPU-a::0"]),
            Err(DeviceIdError::Duplicate(_))
        ));
        assert_eq!(
            GpuSelection::spanning::<&str>(&[]),
            Err(DeviceIdError::Empty)
        );
    }

    proptest! {
        #[test]
        fn ids_round_trip(uuid in "[A-Za-z0-9-]{1,40}(:[A-Za-z0-9-]{1,8})?", unit in any::<u64>()) {
            let id = DeviceId::new(uuid, unit);
            prop_assert_eq!(id.to_string().parse::<DeviceId>(), Ok(id));
        }

        #[test]
        fn parsing_never_panics(s in ".*") {
            let _ = s.parse::<DeviceId>();
        }
    }
}
