//! The committed CRD copies must equal what the Rust types generate.

use std::path::PathBuf;

#[test]
fn committed_crds_match_the_rust_types() {
    let generated = vramslice_api::crd_yaml().expect("CRD renders");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for rel in [
        "charts/vramslice/crds/gpunodes.vramslice.io.yaml",
        "manifests/crds/gpunodes.vramslice.io.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| {
            panic!(
                "{rel} is missing ({e}); run `cargo run -p vramslice-api --bin crdgen -- --write`"
            )
        });
        assert!(
            committed == generated,
            "{rel} differs from the GpuNode type; run `cargo run -p vramslice-api --bin crdgen -- --write`"
        );
    }
}

#[test]
fn crd_has_the_printer_columns_kubectl_shows() {
    let generated = vramslice_api::crd_yaml().expect("CRD renders");
    for column in ["GPUs", "Total", "Live Free", "Allocated", "Healthy", "Age"] {
        assert!(
            generated.contains(&format!("name: {column}")),
            "column {column} missing"
        );
    }
    assert!(generated.contains("scope: Cluster"));
}
