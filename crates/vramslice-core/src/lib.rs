//! The pure core of vramslice: every decision the system makes, with no I/O.
//!
//! Data enters as plain values (byte counts, unit names, GPU readings, device IDs, pod requests)
//! and leaves as plain values (advertised devices, resource names, fit verdicts, scores). The
//! binaries (device plugin, extender, kubectl plugin) read the world, call into this crate, and
//! write the answer back; nothing here touches a socket, a file or a clock.

// Shared vocabulary.
pub mod device_id;
pub mod duration;
pub mod effective_free;
pub mod exposition;
pub mod names;
pub mod quantity;
pub mod units;

// Decisions, by the seam where they are made.
pub mod cluster;
pub mod container;
pub mod node;

pub use device_id::{DeviceId, DeviceIdError, GpuSelection};
pub use duration::{DurationError, format_duration, parse_duration};
pub use node::inventory::{AdvertisedDevice, GpuInventory, GpuUnitsView, PodPlacement, owed_gpus};
pub use quantity::{ByteSize, QuantityError, format_bytes, parse_bytes, parse_whole};
pub use units::{RESOURCE_PREFIX, UnitError, VramUnit};
