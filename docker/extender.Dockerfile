# syntax=docker/dockerfile:1.7
# vramslice scheduler extender (also serves the admission webhook).
#
#   docker build -f docker/extender.Dockerfile -t ghcr.io/vramslice/extender:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vramslice-extender \
    && install -D -m 0755 target/release/vramslice-extender /out/vramslice-extender

# distroless/cc: glibc and CA certificates, no shell, no package manager; runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="vramslice-extender" \
      org.opencontainers.image.description="vramslice scheduler extender and admission webhook" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/vramslice-extender /usr/local/bin/vramslice-extender
USER 65532:65532
EXPOSE 8888 8889 8443
ENTRYPOINT ["/usr/local/bin/vramslice-extender"]
CMD ["--config", "/etc/vramslice/extender.yaml"]
