//! The CDI spec of a prepared claim: one CDI device per claim (kind `vramslice.io/claim`, name
//! = the claim's UID) whose container edits are the claim's environment and mounts. The
//! container runtime reads specs from the CDI directory (`/var/run/cdi`) and applies the
//! edits of the device IDs the kubelet passes on.

use std::path::{Path, PathBuf};

use serde::Serialize;
use vramslice_core::node::allocation::ContainerEdits;

/// The CDI kind of vramslice's claim devices.
pub const CDI_KIND: &str = "vramslice.io/claim";
/// The CDI spec version written (the first with every field used here).
pub const CDI_VERSION: &str = "0.6.0";

/// The fully qualified CDI device ID of a claim: `vramslice.io/claim=<uid>`.
pub fn device_id(claim_uid: &str) -> String {
    format!("{CDI_KIND}={claim_uid}")
}

/// Where a claim's spec lives in `cdi_dir`: `vramslice.io-claim_<key>.json`.
pub fn spec_path(cdi_dir: &Path, claim_key: &str) -> PathBuf {
    cdi_dir.join(format!("{SPEC_PREFIX}{claim_key}.json"))
}

const SPEC_PREFIX: &str = "vramslice.io-";

/// Whether a file name in the CDI directory is one of this driver's specs ([`spec_path`]);
/// other drivers write there too.
pub fn is_spec_name(name: &str) -> bool {
    name.starts_with(SPEC_PREFIX) && name.ends_with(".json")
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec<'a> {
    cdi_version: &'static str,
    kind: &'static str,
    devices: [SpecDevice<'a>; 1],
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SpecDevice<'a> {
    name: &'a str,
    container_edits: Edits,
}

#[derive(Debug, Serialize)]
struct Edits {
    env: Vec<String>,
    mounts: Vec<Mount>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Mount {
    host_path: String,
    container_path: String,
    options: Vec<&'static str>,
}

/// The JSON text of a claim's CDI spec.
pub fn spec_json(claim_uid: &str, edits: &ContainerEdits) -> Result<String, serde_json::Error> {
    let spec = Spec {
        cdi_version: CDI_VERSION,
        kind: CDI_KIND,
        devices: [SpecDevice {
            name: claim_uid,
            container_edits: Edits {
                env: edits.envs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                mounts: edits
                    .mounts
                    .iter()
                    .map(|m| Mount {
                        host_path: m.host_path.clone(),
                        container_path: m.container_path.clone(),
                        options: if m.read_only {
                            vec!["ro", "nosuid", "nodev", "bind"]
                        } else {
                            vec!["rw", "nosuid", "nodev", "bind"]
                        },
                    })
                    .collect(),
            },
        }],
    };
    serde_json::to_string_pretty(&spec)
}
