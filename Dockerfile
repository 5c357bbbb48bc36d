# balancer serve in a container.
#
#   docker build -t swift-balancer .          (or: podman build -t swift-balancer .)
#   docker run --rm -p 8080:8080 swift-balancer
#   docker run --rm -p 8080:8080 -e BALANCER_WORKERS=16 \
#       -v "$PWD/config/production.json:/etc/balancer/balancer.json:ro" \
#       -e BALANCER_CONFIG=/etc/balancer/balancer.json swift-balancer
#
# Every setting can be given as a BALANCER_* environment variable; those beat
# the mounted file. The binary is PID 1 and drains on SIGTERM (docker stop).

# ---- build: the official Swift image, a release binary with the Swift runtime linked in
ARG SWIFT_IMAGE=swift:6.3-bookworm
FROM ${SWIFT_IMAGE} AS build
WORKDIR /src
# Resolve dependencies first so this layer is cached while the sources change.
COPY Package.swift ./
RUN swift package resolve
COPY Sources ./Sources
RUN swift build -c release --static-swift-stdlib --product balancer \
    && install -D "$(swift build -c release --show-bin-path)/balancer" /out/balancer

# ---- run: a slim image with the binary and a non-root user
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin balancer
COPY --from=build /out/balancer /usr/local/bin/balancer
COPY config/ /etc/balancer/
USER balancer
ENV BALANCER_HOST=0.0.0.0
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/balancer", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/balancer"]
CMD ["serve"]
