# balancer serve in a container.
#
#   docker build -t swift-balancer .          (or: podman build --format docker -t swift-balancer .)
#   docker run --rm -p 8080:8080 swift-balancer
#   docker run --rm -p 8080:8080 -e BALANCER_WORKERS=16 \
#       -v "$PWD/config/production.json:/etc/balancer/balancer.json:ro" \
#       -e BALANCER_CONFIG=/etc/balancer/balancer.json swift-balancer
#
# Every setting can be given as a BALANCER_* environment variable; those beat
# the mounted file. The binary is PID 1 and drains on SIGTERM (docker stop).
#
# Targets: the default (last) stage `runtime` compiles the binary in the
# official Swift image. `--target prebuilt` instead copies a binary that was
# already built on a Linux host (`swift build -c release --static-swift-stdlib`)
# from the build context, with the same runtime image around it; that is how
# scripts/container-test.sh builds this file where no Swift image can be pulled:
#
#   docker build --target prebuilt --build-arg PREBUILT_BINARY=balancer -f Dockerfile CONTEXT
#   (CONTEXT holds the binary and config/; the Swift stage is not built.)
#
# SWIFT_IMAGE and RUNTIME_IMAGE name the two base images, for mirrors and
# local stand-ins.

ARG SWIFT_IMAGE=swift:6.3-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- build: the official Swift image, a release binary with the Swift runtime linked in
FROM ${SWIFT_IMAGE} AS build
WORKDIR /src
# Resolve dependencies first so this layer is cached while the sources change.
COPY Package.swift ./
RUN swift package resolve
COPY Sources ./Sources
# The manifest declares the test targets too; their folders must exist.
COPY Tests ./Tests
# Stripped on install (`install -s`): the symbol tables are a third of the binary.
RUN swift build -c release --static-swift-stdlib --product balancer \
    && install -D -s "$(swift build -c release --show-bin-path)/balancer" /out/balancer

# ---- base: a slim Debian with a fixed non-root user; everything but the binary
FROM ${RUNTIME_IMAGE} AS base
# Versions are not pinned: Debian's security updates replace a package's
# version in the archive, so a pin would break the build after the next
# update; bookworm's stable policy already fixes what these two packages are.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 balancer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin balancer
COPY config/ /etc/balancer/
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
ENV BALANCER_HOST=0.0.0.0
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/balancer", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/balancer"]
CMD ["serve"]

# ---- prebuilt: the runtime around a binary built outside this file
FROM base AS prebuilt
ARG PREBUILT_BINARY=balancer
COPY ${PREBUILT_BINARY} /usr/local/bin/balancer

# ---- runtime (default): the runtime around the binary from the build stage
FROM base AS runtime
COPY --from=build /out/balancer /usr/local/bin/balancer
