//! The VRAM unit: how many bytes one advertised device stands for, and the extended-resource
//! name that carries it (`vramslice.io/vram-gib`, `vramslice.io/vram-512mib`, ...).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix shared by every vramslice extended resource name.
pub const RESOURCE_PREFIX: &str = "vramslice.io/vram-";

const MIB: u64 = 1024 * 1024;

/// The size of one advertised VRAM unit. Only these four sizes exist; the resource name says
/// which one a cluster uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum VramUnit {
    /// 128 MiB per unit: `vramslice.io/vram-128mib`.
    Mib128,
    /// 256 MiB per unit: `vramslice.io/vram-256mib`.
    Mib256,
    /// 512 MiB per unit: `vramslice.io/vram-512mib`.
    Mib512,
    /// 1 GiB per unit (the default): `vramslice.io/vram-gib`.
    #[default]
    Gib1,
}

/// A unit string or resource name that is not one of the four supported units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The unit string is not `1Gi`, `512Mi`, `256Mi` or `128Mi`.
    #[error("unknown VRAM unit {0:?}: expected one of 1Gi, 512Mi, 256Mi, 128Mi")]
    UnknownUnit(String),
    /// The resource name is not a vramslice VRAM resource.
    #[error(
        "{0:?} is not a vramslice VRAM resource: expected one of vramslice.io/vram-gib, \
         vramslice.io/vram-512mib, vramslice.io/vram-256mib, vramslice.io/vram-128mib"
    )]
    UnknownResource(String),
}

impl VramUnit {
    /// Every supported unit, smallest first.
    pub const ALL: [VramUnit; 4] = [
        VramUnit::Mib128,
        VramUnit::Mib256,
        VramUnit::Mib512,
        VramUnit::Gib1,
    ];

    /// Bytes in one unit.
    pub const fn bytes(self) -> u64 {
        match self {
            VramUnit::Mib128 => 128 * MIB,
            VramUnit::Mib256 => 256 * MIB,
            VramUnit::Mib512 => 512 * MIB,
            VramUnit::Gib1 => 1024 * MIB,
        }
    }

    /// The unit as written in configuration: `1Gi`, `512Mi`, `256Mi`, `128Mi`.
    pub const fn as_str(self) -> &'static str {
        match self {
            VramUnit::Mib128 => "128Mi",
            VramUnit::Mib256 => "256Mi",
            VramUnit::Mib512 => "512Mi",
            VramUnit::Gib1 => "1Gi",
        }
    }

    /// The extended resource name that carries this unit.
    pub const fn resource_name(self) -> &'static str {
        match self {
            VramUnit::Mib128 => "vramslice.io/vram-128mib",
            VramUnit::Mib256 => "vramslice.io/vram-256mib",
            VramUnit::Mib512 => "vramslice.io/vram-512mib",
            VramUnit::Gib1 => "vramslice.io/vram-gib",
        }
    }

    /// The unit a resource name stands for, if it is a vramslice VRAM resource.
    pub fn from_resource_name(name: &str) -> Result<VramUnit, UnitError> {
        VramUnit::ALL
            .into_iter()
            .find(|u| u.resource_name() == name)
            .ok_or_else(|| UnitError::UnknownResource(name.to_string()))
    }

    /// Whole units a GPU of `total_bytes` advertises: floor(total / unit), never more.
    pub const fn units_in(self, total_bytes: u64) -> u64 {
        total_bytes / self.bytes()
    }

    /// Bytes that `units` units stand for, saturating at `u64::MAX`.
    pub const fn bytes_for(self, units: u64) -> u64 {
        units.saturating_mul(self.bytes())
    }

    /// Units needed to hold `bytes`, rounded up.
    pub const fn units_to_hold(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.bytes())
    }
}

impl fmt::Display for VramUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VramUnit {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1Gi" | "1024Mi" => Ok(VramUnit::Gib1),
            "512Mi" => Ok(VramUnit::Mib512),
            "256Mi" => Ok(VramUnit::Mib256),
            "128Mi" => Ok(VramUnit::Mib128),
            other => Err(UnitError::UnknownUnit(other.to_string())),
        }
    }
}

impl Serialize for VramUnit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for VramUnit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_match_the_contract() {
        assert_eq!(VramUnit::Gib1.resource_name(), "vramslice.io/vram-gib");
        assert_eq!(VramUnit::Mib512.resource_name(), "vramslice.io/vram-512mib");
        assert_eq!(VramUnit::Mib256.resource_name(), "vramslice.io/vram-256mib");
        assert_eq!(VramUnit::Mib128.resource_name(), "vramslice.io/vram-128mib");
        for unit in VramUnit::ALL {
            assert!(unit.resource_name().starts_with(RESOURCE_PREFIX));
            assert_eq!(VramUnit::from_resource_name(unit.resource_name()), Ok(unit));
            assert_eq!(unit.as_str().parse::<VramUnit>(), Ok(unit));
        }
    }

    #[test]
    fn unknown_units_are_named_in_the_error() {
        let err = "2Gi".parse::<VramUnit>().unwrap_err();
        assert!(err.to_string().contains("\"2Gi\""), "{err}");
        let err = VramUnit::from_resource_name("nvidia.com/gpu").unwrap_err();
        assert!(err.to_string().contains("nvidia.com/gpu"), "{err}");
    }

    #[test]
    fn an_80_gib_card_advertises_80_gib_units() {
        let h100 = 81_559_207_936_u64; // what NVML reports for an H100 80GB HBM3
        assert_eq!(VramUnit::Gib1.units_in(h100), 75);
        assert_eq!(VramUnit::Gib1.units_in(80 << 30), 80);
        assert_eq!(VramUnit::Mib512.units_in(80 << 30), 160);
        assert_eq!(VramUnit::Gib1.units_to_hold((6 << 30) + 1), 7);
    }
}
