# syntax=docker/dockerfile:1.7
# vramslice device plugin + the guard library it installs on each GPU node.
#
#   docker build -f docker/device-plugin.Dockerfile -t ghcr.io/vramslice/device-plugin:0.1.0 .
#
# Build context: the repository root. The image holds
#   /usr/local/bin/vramslice-device-plugin
#   /opt/vramslice/lib/libvramslice_guard.so   (copied to the host by the chart's init container)

ARG RUST_VERSION=1.95
ARG GLIBC_FLOOR=2.28

# --- the plugin, built against the same Debian release as the runtime image ----------------
FROM rust:${RUST_VERSION}-bookworm AS plugin
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vramslice-device-plugin \
    && install -D -m 0755 target/release/vramslice-device-plugin /out/vramslice-device-plugin

# --- the guard, linked against an old glibc so it loads in every CUDA base image ------------
# The guard is preloaded into *workload* containers (CUDA images from Ubuntu 20.04 / RHEL 8 on,
# glibc 2.28+), not into this image, so it must not need symbols newer than the floor.
# cargo-zigbuild links against the requested glibc version with zig as the linker.
FROM rust:${RUST_VERSION}-bookworm AS guard
ARG GLIBC_FLOOR
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Build-stage tools only (nothing here reaches the runtime image): Debian's current binutils
# and pip are fine unpinned; the Python tools that shape the output are pinned.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip binutils \
    && rm -rf /var/lib/apt/lists/* \
    && pip3 install --no-cache-dir --break-system-packages ziglang==0.13.0 cargo-zigbuild==0.20.1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    rustup target add x86_64-unknown-linux-gnu \
    && cargo zigbuild --release --locked -p vramslice-guard --target "x86_64-unknown-linux-gnu.${GLIBC_FLOOR}" \
    && lib=target/x86_64-unknown-linux-gnu/release/libvramslice_guard.so \
    && newest="$(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)" \
    && echo "libvramslice_guard.so needs glibc ${newest} (floor ${GLIBC_FLOOR})" \
    && [ "$(printf '%s\n%s\n' "$newest" "$GLIBC_FLOOR" | sort -V | tail -n1)" = "$GLIBC_FLOOR" ] \
    && install -D -m 0644 "$lib" /out/libvramslice_guard.so

# --- runtime -------------------------------------------------------------------------------
# Debian slim, not distroless: the chart's init container uses /bin/sh, cp and mv to place the
# guard on the host atomically; NVML (libnvidia-ml.so.1) is injected by the NVIDIA container
# runtime and needs glibc.
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="vramslice-device-plugin" \
      org.opencontainers.image.description="vramslice device plugin and CUDA guard library" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=plugin /out/vramslice-device-plugin /usr/local/bin/vramslice-device-plugin
COPY --from=guard /out/libvramslice_guard.so /opt/vramslice/lib/libvramslice_guard.so
# Root on purpose: the plugin creates its socket in the root-owned kubelet directory
# (/var/lib/kubelet/device-plugins), dials the kubelet's PodResources socket, writes the host's
# /var/lib/vramslice, reads other containers' accounting files and /proc/<pid>/cgroup under
# hostPID, and may signal an offending process. The chart drops every capability but KILL and
# DAC_READ_SEARCH and makes the root filesystem read-only.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/vramslice-device-plugin"]
CMD ["--config", "/etc/vramslice/device-plugin.yaml"]
