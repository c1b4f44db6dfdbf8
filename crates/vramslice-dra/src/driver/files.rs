//! The claim's files on the node: its CDI spec, limit file and accounting directory, written,
//! written again, removed, and the temporaries an interrupted write left.

use std::path::Path;

use vramslice_core::node::allocation::LIMIT_FILE_HOST_SUFFIX;

use super::{ClaimRef, DriverConfig, PrepareError};
use crate::cdi;
use crate::checkpoint::{
    PreparedClaim, PreparedFiles, sweep_leftover_temporaries, write_atomically,
};

/// Delete the temporary files an earlier process left when it stopped between writing one and
/// renaming it ([`write_atomically`]): in the checkpoint's directory, the CDI directory and the
/// accounting root, only those of this driver's files. A failure is logged: the leftovers are
/// harmless, only untidy.
pub(super) fn sweep_leftovers(config: &DriverConfig) {
    let checkpoint_name = config.checkpoint.file_name().and_then(|n| n.to_str());
    type Ours<'a> = &'a dyn Fn(&str) -> bool;
    let places: [(&Path, Ours); 3] = [
        (
            config.checkpoint.parent().unwrap_or(Path::new(".")),
            &|base| Some(base) == checkpoint_name,
        ),
        (&config.cdi_dir, &cdi::is_spec_name),
        (&config.settings.accounting_root, &|base| {
            base.ends_with(LIMIT_FILE_HOST_SUFFIX)
        }),
    ];
    for (dir, ours) in places {
        match sweep_leftover_temporaries(dir, ours) {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(dir = %dir.display(), deleted, "deleted temporary files left by an interrupted write");
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "could not delete temporary files left by an interrupted write");
            }
        }
    }
}

/// What an I/O failure on `path` while (un)preparing `claim` becomes.
pub(super) fn io_error(
    claim: &ClaimRef,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> PrepareError + use<> {
    let (claim, path) = (claim.label(), path.display().to_string());
    move |source| PrepareError::Io {
        claim,
        path,
        source,
    }
}

/// Write a prepared claim's files again where they are gone, from its checkpoint. `false` when
/// one is gone and the checkpoint does not hold it (written by an earlier version).
pub(super) fn restore_files(claim: &ClaimRef, done: &PreparedClaim) -> Result<bool, PrepareError> {
    let files = &done.files;
    for (path, text) in [
        (&files.cdi_spec, &done.cdi_spec_text),
        (&files.limit_file, &done.limit_file_text),
    ] {
        if path.exists() {
            continue;
        }
        let Some(text) = text else {
            return Ok(false);
        };
        write_atomically(path, text.as_bytes()).map_err(io_error(claim, path))?;
        tracing::info!(claim = %claim.label(), path = %path.display(), "wrote a prepared claim's file again");
    }
    create_accounting_dir(claim, &files.accounting_dir)?;
    Ok(true)
}

/// Create a claim's accounting directory, writable by every user and sticky (01777, as the
/// device plugin makes its allocations'): the guard in a container running as any user creates
/// the shared accounting file there (under the limit file it refuses every allocation without
/// it), and only a file's owner may remove or rename it.
pub(super) fn create_accounting_dir(claim: &ClaimRef, dir: &Path) -> Result<(), PrepareError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)))
        .map_err(io_error(claim, dir))
}

/// Remove a claim's CDI spec, limit file and accounting directory; those already gone are fine.
pub(super) fn remove_files(claim: &ClaimRef, files: &PreparedFiles) -> Result<(), PrepareError> {
    for file in [&files.cdi_spec, &files.limit_file] {
        remove_file(file).map_err(io_error(claim, file))?;
    }
    match std::fs::remove_dir_all(&files.accounting_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_error(claim, &files.accounting_dir)(source)),
    }
}

fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
