//! The committed C header must equal what cbindgen generates from the source now.
//! Regenerate with `VRAMSLICE_BLESS=1 cargo test -p vramslice-sidecar --test header`.
#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn committed_header_matches_generated() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .unwrap()
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("include/vramslice_sidecar.h");
    if std::env::var_os("VRAMSLICE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate with VRAMSLICE_BLESS=1 cargo test -p vramslice-sidecar --test header",
        path.display()
    );
    for name in [
        "vramslice_admit",
        "vramslice_permit_complete",
        "vramslice_render_metrics",
    ] {
        assert!(generated.contains(name), "{name} missing from the header");
    }
}
