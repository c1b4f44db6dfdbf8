//! gRPC over Unix sockets: a tonic channel to a socket path (the kubelet's registration and
//! PodResources sockets).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connect a channel to the Unix socket at `path`; connecting and each call fail after
/// `timeout`.
pub async fn connect(path: &Path, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    connect_with_call_timeout(path, timeout, timeout).await
}

/// [`connect`], with calls allowed `call_timeout` (longer than the connection: the kubelet
/// answers `Register` only after it has dialled the plugin back and read its options).
pub async fn connect_with_call_timeout(
    path: &Path,
    timeout: Duration,
    call_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .timeout(call_timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// An error with its whole source chain (`transport error: No such file or directory`).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}
