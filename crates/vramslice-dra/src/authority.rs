//! A shim in front of the registration socket that rewrites an invalid HTTP/2 `:authority`.
//!
//! Why it exists: the kubelet's plugin watcher dials the registration socket with
//! `grpc.DialContext(ctx, socketPath, WithContextDialer(unix), ...)`, i.e. grpc-go's passthrough
//! resolver, which sends the socket *path* (`/var/lib/kubelet/plugins_registry/...-reg.sock`)
//! as the `:authority` pseudo-header. The `h2` crate under tonic rejects that as a malformed
//! authority and resets the stream with `PROTOCOL_ERROR`, so on a real node GetInfo is never
//! answered and the driver never registers (hyperium/h2#442, #487; hyperium/tonic#243,
//! #1876; kubernetes/kubernetes#109081; the h2 maintainers keep the check).
//!
//! So the registration socket is accepted here instead of by tonic: each connection is proxied
//! to the tonic server over an in-process [`UnixStream::pair`]. Client→server, every HEADERS
//! block (HEADERS plus CONTINUATION frames up to END_HEADERS) is decoded with one HPACK
//! decoder per connection (the client's dynamic table is stateful), an `:authority` that is no
//! valid URI authority becomes `localhost`, and the block is re-encoded as literal fields
//! without indexing and without Huffman coding, so the server's decoding table stays empty and
//! in step. Padding is dropped, a PRIORITY field kept. Every other frame, and everything
//! server→client, passes through unchanged. A malformed stream closes that connection with a
//! log line.

use std::io;

use loona_hpack::Decoder;
use loona_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::Authority;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may announce: re-encoded blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// The most header-block bytes buffered for one HEADERS/CONTINUATION sequence.
const MAX_BLOCK: usize = 1 << 20;
/// What an invalid `:authority` becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// Accept connections on `listener`, proxy each through the rewriting shim, and yield the
/// server ends for `Server::serve_with_incoming_shutdown`. Accepting stops once the stream is
/// dropped (the server has shut down).
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let client = match accepted {
                Ok((client, _)) => client,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the registration socket");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (ours, theirs) = match UnixStream::pair() {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "creating the registration shim's socket pair");
                    continue;
                }
            };
            tokio::spawn(proxy(client, ours));
            if tx.send(Ok(theirs)).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Proxy one connection: client→server rewritten, server→client copied.
async fn proxy(client: UnixStream, server: UnixStream) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        let result = rewrite(&mut client_rx, &mut server_tx).await;
        if result.is_ok() {
            let _ = server_tx.shutdown().await;
        }
        result
    };
    let down = async {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        result = &mut up => match result {
            Ok(()) => down.await,
            Err(e) => tracing::warn!(error = %e, "closing a registration connection"),
        },
        () = &mut down => {}
    }
}

fn malformed(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A header block being gathered across HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Copy the client's HTTP/2 byte stream from `from` to `to`, rewriting header blocks. Returns
/// `Ok` at the client's end of stream on a frame boundary, an error for anything malformed.
pub async fn rewrite<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(malformed("no HTTP/2 client preface"));
    }
    to.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut pending: Option<Block> = None;
    loop {
        let mut head = [0u8; 9];
        // End of stream is clean only between frames and outside a header block.
        if from.read(&mut head[..1]).await? == 0 {
            return match pending {
                None => Ok(()),
                Some(_) => Err(malformed("end of stream inside a header block")),
            };
        }
        from.read_exact(&mut head[1..]).await?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if let Some(block) = pending.as_mut() {
            if kind != CONTINUATION || stream != block.stream {
                return Err(malformed(format!(
                    "frame type {kind} on stream {stream} inside the header block of stream {}",
                    block.stream
                )));
            }
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(malformed("header block too large"));
            }
            block.fragment.extend_from_slice(&payload);
            if flags & END_HEADERS != 0
                && let Some(block) = pending.take()
            {
                forward_block(&mut decoder, block, to).await?;
            }
            continue;
        }
        match kind {
            HEADERS => {
                let block = headers_frame(stream, flags, payload)?;
                if flags & END_HEADERS != 0 {
                    forward_block(&mut decoder, block, to).await?;
                } else {
                    pending = Some(block);
                }
            }
            CONTINUATION => {
                return Err(malformed(format!(
                    "CONTINUATION on stream {stream} outside a header block"
                )));
            }
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
            }
        }
    }
}

/// Strip padding and the priority field off a HEADERS frame's payload.
fn headers_frame(stream: u32, flags: u8, payload: Vec<u8>) -> io::Result<Block> {
    let mut rest: &[u8] = &payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, tail) = rest
            .split_first()
            .ok_or_else(|| malformed("PADDED HEADERS without a pad length"))?;
        pad = usize::from(n);
        rest = tail;
    }
    let priority = if flags & PRIORITY != 0 {
        let (field, tail) = rest
            .split_first_chunk::<5>()
            .ok_or_else(|| malformed("PRIORITY HEADERS without a priority field"))?;
        rest = tail;
        Some(*field)
    } else {
        None
    };
    if pad > rest.len() {
        return Err(malformed("HEADERS padding longer than the frame"));
    }
    let fragment = rest[..rest.len() - pad].to_vec();
    if fragment.len() > MAX_BLOCK {
        return Err(malformed("header block too large"));
    }
    Ok(Block {
        stream,
        end_stream: flags & END_STREAM != 0,
        priority,
        fragment,
    })
}

/// Decode a complete header block, fix its `:authority`, and write it out as HEADERS (and
/// CONTINUATION) frames of literal fields without indexing.
async fn forward_block<W: AsyncWrite + Unpin>(
    decoder: &mut Decoder<'_>,
    block: Block,
    to: &mut W,
) -> io::Result<()> {
    let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
    let mut result = Ok(());
    decoder
        .decode_with_cb(&block.fragment, |name, value| {
            let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                tracing::debug!(
                    authority = %String::from_utf8_lossy(&value),
                    "rewriting an invalid :authority to localhost"
                );
                REPLACEMENT
            } else {
                &value
            };
            if result.is_ok() {
                result = literal(&name, value, &mut encoded);
            }
        })
        .map_err(|e| malformed(format!("HPACK: {e:?}")))?;
    result?;

    let mut first = true;
    let mut rest: &[u8] = &encoded;
    loop {
        let mut frame = Vec::with_capacity(MAX_FRAME + 9);
        let (kind, mut flags, room) = if first {
            let mut flags = if block.end_stream { END_STREAM } else { 0 };
            if block.priority.is_some() {
                flags |= PRIORITY;
            }
            let room = MAX_FRAME - if block.priority.is_some() { 5 } else { 0 };
            (HEADERS, flags, room)
        } else {
            (CONTINUATION, 0, MAX_FRAME)
        };
        let take = rest.len().min(room);
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let len = chunk.len()
            + if first && block.priority.is_some() {
                5
            } else {
                0
            };
        let len = u32::try_from(len).map_err(|_| malformed("frame too long"))?;
        frame.extend_from_slice(&len.to_be_bytes()[1..]);
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&block.stream.to_be_bytes());
        if first && let Some(priority) = block.priority {
            frame.extend_from_slice(&priority);
        }
        frame.extend_from_slice(chunk);
        to.write_all(&frame).await?;
        first = false;
        if rest.is_empty() {
            return Ok(());
        }
    }
}

/// Whether `value` parses as a URI authority the way the server's h2 checks it.
fn valid_authority(value: &[u8]) -> bool {
    Authority::try_from(value).is_ok()
}

/// One literal header field without indexing, new name, no Huffman coding (RFC 7541 §6.2.2).
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    out.push(0x00);
    encode_integer_into(name.len(), 7, 0, out)?;
    out.extend_from_slice(name);
    encode_integer_into(value.len(), 7, 0, out)?;
    out.extend_from_slice(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    async fn run(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        rewrite(&mut input.as_slice(), &mut out).await?;
        Ok(out)
    }

    /// Split `bytes` into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    const REQUEST: &[(&[u8], &[u8])] = &[
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pluginregistration.Registration/GetInfo"),
        (
            b":authority",
            b"/var/lib/kubelet/plugins_registry/vramslice.io-reg.sock",
        ),
        (b"content-type", b"application/grpc"),
    ];

    #[tokio::test]
    async fn padded_prioritised_continued_headers_are_rewritten_and_the_rest_passes() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(REQUEST.iter().copied());
        let (a, b) = block.split_at(10);
        // HEADERS with PADDED (3 bytes of padding) and PRIORITY, then one CONTINUATION.
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let settings = frame(4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        let data = frame(0, END_STREAM, 1, b"\0\0\0\0\0");
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(&data);
        // A second request on stream 3 refers to the dynamic table the first one filled.
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &encoder.encode(REQUEST.iter().copied()),
        ));
        let out = run(input).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        let got = frames(&out[24..]);
        assert_eq!(got.len(), 4);
        assert_eq!(frame(got[0].0, got[0].1, got[0].2, &got[0].3), settings);
        assert_eq!(frame(got[2].0, got[2].1, got[2].2, &got[2].3), data);
        let expected: Vec<(Vec<u8>, Vec<u8>)> = REQUEST
            .iter()
            .map(|(n, v)| {
                let v: &[u8] = if *n == b":authority" { b"localhost" } else { v };
                (n.to_vec(), v.to_vec())
            })
            .collect();
        let mut server = Decoder::new();
        let (kind, flags, stream, payload) = &got[1];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_HEADERS, 1)
        );
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 15]);
        assert_eq!(server.decode(&payload[5..]).unwrap(), expected);
        let (kind, flags, stream, payload) = &got[3];
        assert_eq!((*kind, *flags, *stream), (HEADERS, END_HEADERS, 3));
        assert_eq!(server.decode(payload).unwrap(), expected);
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([(&b":authority"[..], &b"localhost:50051"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        let out = run(input).await.unwrap();
        let got = frames(&out[24..]);
        assert_eq!(got[0].1, END_HEADERS | END_STREAM);
        assert_eq!(
            Decoder::new().decode(&got[0].3).unwrap(),
            [(b":authority".to_vec(), b"localhost:50051".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_big_block_is_cut_into_continuations() {
        let big = vec![b'x'; 40_000];
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([(&b"x-big"[..], &big[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let got = frames(&run(input).await.unwrap()[24..]);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(
            got.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
            [(HEADERS, 0), (CONTINUATION, 0), (CONTINUATION, END_HEADERS)]
        );
        let joined: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        assert_eq!(
            Decoder::new().decode(&joined).unwrap(),
            [(b"x-big".to_vec(), big)]
        );
    }

    #[tokio::test]
    async fn malformed_input_is_an_error_not_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            [PREFACE.to_vec(), frame(CONTINUATION, END_HEADERS, 1, b"")].concat(),
            [
                PREFACE.to_vec(),
                frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 1]),
            ]
            .concat(),
            [
                PREFACE.to_vec(),
                frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0]),
            ]
            .concat(),
            [
                PREFACE.to_vec(),
                frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]),
            ]
            .concat(),
            [
                PREFACE.to_vec(),
                frame(HEADERS, 0, 1, &[0x82]),
                frame(0, 0, 1, b"data"),
            ]
            .concat(),
            [PREFACE.to_vec(), frame(HEADERS, 0, 1, &[0x82])].concat(),
            [PREFACE.to_vec(), vec![0, 0, 5, 0]].concat(),
        ];
        for (i, case) in cases.into_iter().enumerate() {
            assert!(run(case).await.is_err(), "case {i}");
        }
    }
}
