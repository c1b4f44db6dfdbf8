//! Print the `GpuNode` CRD YAML (`cargo run -p vramslice-api --bin crdgen > file`), or with
//! `--write` update every committed copy in the repository.

use std::path::PathBuf;
use std::process::ExitCode;

/// Committed copies of the CRD, relative to the repository root.
const COMMITTED: [&str; 2] = [
    "charts/vramslice/crds/gpunodes.vramslice.io.yaml",
    "manifests/crds/gpunodes.vramslice.io.yaml",
];

fn main() -> ExitCode {
    let yaml = match vramslice_api::crd_yaml() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: cannot render the CRD: {err}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::args().nth(1).as_deref() != Some("--write") {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for rel in COMMITTED {
        let path = root.join(rel);
        let result = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&path, &yaml));
        if let Err(err) = result {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {rel}");
    }
    ExitCode::SUCCESS
}
