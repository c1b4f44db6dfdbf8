# syntax=docker/dockerfile:1.7
# kubectl-vramslice in an image (for CI jobs and debug pods). For a workstation, copy the binary
# onto PATH instead: `docker build --target export --output type=local,dest=. -f ...` writes
# ./kubectl-vramslice.
#
#   docker build -f docker/kubectl-vramslice.Dockerfile -t ghcr.io/vramslice/kubectl-vramslice:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubectl-vramslice \
    && install -D -m 0755 target/release/kubectl-vramslice /out/kubectl-vramslice

FROM scratch AS export
COPY --from=build /out/kubectl-vramslice /kubectl-vramslice

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="kubectl-vramslice" \
      org.opencontainers.image.description="kubectl plugin for vramslice" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/kubectl-vramslice /usr/local/bin/kubectl-vramslice
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubectl-vramslice"]
