//! vramslice's DRA kubelet plugin (DRA mode, beside the device-plugin mode).
//!
//! Data enters from three sides: GPU samples from the `GpuBackend` (NVML or fake), the
//! kubelet's gRPC calls (plugin registration, then NodePrepareResources /
//! NodeUnprepareResources for claims of driver `vramslice.io`), and `ResourceClaim`s read from
//! the API server. It leaves as the node's `ResourceSlice` (each GPU one device whose
//! `memory` capacity follows the measurement, by [`vramslice_core::effective_free`]; an
//! unhealthy one tainted), and per
//! prepared claim a CDI spec, a read-only limit file and an accounting directory, which the
//! container runtime turns into the guard, its per-GPU limits and the visible GPUs.
//!
//! The decisions (slice content, when to publish, what a claim gets) are the core's
//! ([`vramslice_core::node::dra`]); this crate is the shell: [`driver`] does the files and the
//! checkpoint, [`grpc`] and [`registration`] adapt the kubelet's protocol, [`slices`] writes
//! the slice, [`serve`] binds the sockets
//! ([`authority`] fixes the `:authority` the kubelet's plugin watcher sends).

pub mod authority;
pub mod cdi;
pub mod checkpoint;
pub mod claims;
pub mod driver;
pub mod grpc;
pub mod registration;
pub mod serve;
pub mod slices;

/// The longest one API server call of this crate's adapters ([`claims::KubeClaims`],
/// [`slices::KubeSlices`]) waits. The kube client has no read timeout (watches hold their
/// connections open), so a half-open connection would otherwise stall a prepare or the slice
/// loop (no capacity published, no stale-reading taint) until TCP gives up, many minutes on.
pub const API_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// `call`, or an error naming [`API_CALL_TIMEOUT`] when it has not answered by then.
async fn bounded<T, E: std::fmt::Display>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_CALL_TIMEOUT, call).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the API server did not answer within {}s",
            API_CALL_TIMEOUT.as_secs()
        )),
    }
}

/// Generated from the kubelet's protos under `proto/`.
pub mod proto {
    /// Plugin registration (`pluginregistration`, v1).
    pub mod registration {
        tonic::include_proto!("pluginregistration");
    }
    /// The DRA plugin service (`k8s.io.kubelet.pkg.apis.dra.v1`).
    pub mod dra {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(start_paused = true)]
    async fn an_api_call_that_never_answers_ends_in_an_error_naming_the_wait() {
        let started = tokio::time::Instant::now();
        let hung = std::future::pending::<Result<(), String>>();
        let answer = super::bounded(hung).await;
        assert_eq!(
            answer,
            Err("the API server did not answer within 15s".to_string())
        );
        assert_eq!(started.elapsed(), super::API_CALL_TIMEOUT);
        let quick = super::bounded(async { Err::<(), _>("403 forbidden") }).await;
        assert_eq!(quick, Err("403 forbidden".to_string()));
    }
}
