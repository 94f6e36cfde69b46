# syntax=docker/dockerfile:1
# ferry's images, from one build:
#   docker build -t ferry:0.1.0 .                     # runtime (default, last stage): the
#                                                     # agent, the proxy (as UID 1337), dns,
#                                                     # gateway, export
#   docker build --target init -t ferry-init:0.1.0 .  # the pod init container:
#                                                     # `ferry iptables` with nft/iptables
# The binary links only glibc, libgcc_s and libm (rustls, no OpenSSL), so distroless/cc
# (which also ships the CA certificates) is all the runtime needs.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferry \
 && install -D -m 0755 target/release/ferry /out/ferry

# The init container: `ferry iptables --profile cofide` applies its rules through the nft and
# iptables-restore tools, so this image carries them. It runs as root with NET_ADMIN (and
# NET_RAW), once, before the app starts.
FROM docker.io/library/debian:bookworm-slim AS init
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/ferry /usr/local/bin/ferry
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["iptables", "--profile", "cofide"]

# The runtime image: the binary and CA certificates, nothing else (no shell).
# UID/GID 1337 is the sidecar's: the capture rules let exactly that UID's traffic out
# uncaptured, so `ferry proxy` must run as 1337 (Kubernetes: runAsUser/runAsGroup 1337).
# Other commands may run as any user; deploy/agent.yaml runs the agent as 65532.
FROM gcr.io/distroless/cc-debian12 AS runtime
COPY --from=builder /out/ferry /usr/local/bin/ferry
USER 1337:1337
EXPOSE 10000 15053 9901 18001
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["--help"]
