# staybound container image.
#
#   docker build -t staybound:dev .
#   docker run --rm staybound:dev check --config /etc/staybound/staybound.toml
#
# Two stages:
#   builder  Debian 12 Rust toolchain; `cargo build --release --locked`; the binary ends up at /out/staybound.
#   runtime  the binary, a default config, and nothing else, as a non-root user.
#
# Runtime base: gcr.io/distroless/cc-debian12:nonroot rather than debian:bookworm-slim plus a staybound user.
#   - The binary links glibc and libgcc_s dynamically. distroless "cc" is Debian 12's libc6, libgcc-s1,
#     libstdc++6 and libssl3 plus CA certificates, tzdata and /etc/passwd: what the binary needs, no shell,
#     no package manager, no coreutils. Nothing for an intruder to use, little for a scanner to flag, and
#     the image stays small: bookworm-slim alone would be several times the size of the whole image.
#   - The builder is Debian 12 too, so the glibc the binary is linked against is the one it runs with.
#   - ":nonroot" already has the user nonroot (65532:65532), so this stage has no RUN step: only COPY and
#     metadata. That keeps it trivially reproducible, and lets packaging/image-check.sh build exactly this
#     stage on a local base image without running a container.
#   - There is no shell to exec into. Debug with an ephemeral container
#     (`kubectl debug -it POD --target=staybound --image=busybox`) or build FROM the :debug-nonroot variant.
# For production builds, pin both bases by digest (`--build-arg RUNTIME_BASE=gcr.io/...@sha256:...`).
#
# The image's default config (config/image.toml) listens on loopback only, service and admin alike: a
# sidecar's clients are local. To use your own, mount a directory (a Kubernetes ConfigMap, a bind mount) over /etc/staybound;
# see deploy/kubernetes/staybound-sidecar.yaml. The admin port is EXPOSEd for documentation: it is only
# reachable from outside the container when the config sets `[admin] listen = "0.0.0.0:9901"`.
#
# No HEALTHCHECK: the image has no HTTP client. Orchestrators probe GET /healthz and /readyz on the admin port.

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# The registry and target caches persist between builds (BuildKit, buildah); the binary is copied out of the
# cache mount to /out so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin staybound \
 && install -D -m 0755 target/release/staybound /out/staybound

FROM ${RUNTIME_BASE} AS runtime
LABEL org.opencontainers.image.title="staybound" \
      org.opencontainers.image.description="A sidecar that keeps legacy clients working while the highly-available service behind them fails over" \
      org.opencontainers.image.licenses="Apache-2.0"
# packaging/image-check.sh supplies /out/staybound through `--build-context builder=DIR`: keep the path.
COPY --from=builder /out/staybound /usr/local/bin/staybound
# A loopback-only default (config/image.toml; tests/it/cli.rs checks that it stays so).
COPY config/image.toml /etc/staybound/staybound.toml
# Numeric, so that Kubernetes' runAsNonRoot can verify it without looking the name up.
USER 65532:65532
EXPOSE 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/staybound"]
CMD ["run", "--config", "/etc/staybound/staybound.toml"]
