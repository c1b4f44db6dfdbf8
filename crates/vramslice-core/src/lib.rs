//! The pure core of vramslice: every decision the system makes, with no I/O.
//!
//! Data enters as plain values (byte counts, unit names, GPU readings, device IDs, pod requests)
//! and leaves as plain values (advertised devices, resource names, fit verdicts, scores). The
//! binaries (device plugin, extender, kubectl plugin) read the world, call into this crate, and
//! write the answer back; nothing here touches a socket, a file or a clock.

pub mod accounting;
pub mod admission;
pub mod allocation;
pub mod cgroup;
pub mod device_id;
pub mod duration;
pub mod inventory;
pub mod ledger;
pub mod limit;
pub mod names;
pub mod placement;
pub mod publish;
pub mod quantity;
pub mod sample;
pub mod sweep;
pub mod units;
pub mod watchdog;

pub use device_id::{DeviceId, DeviceIdError, GpuSelection};
pub use duration::{DurationError, format_duration, parse_duration};
pub use inventory::{AdvertisedDevice, GpuInventory, GpuUnitsView, PodPlacement, owed_gpus};
pub use quantity::{ByteSize, QuantityError, format_bytes, parse_bytes};
pub use units::{RESOURCE_PREFIX, UnitError, VramUnit};
