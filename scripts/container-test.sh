#!/usr/bin/env bash
# Builds the top-level Dockerfile with podman and tests the image for real:
# /jobs and /stats answer, `podman stop` (SIGTERM to PID 1) drains in-flight
# jobs and exits 0, the process is not root, the HEALTHCHECK passes; then, in
# upstream mode as deploy/docker-compose.yml runs it, requests are proxied by
# name to two backends. Prints the image size.
#
# No base image can be pulled here, so it makes local stand-ins and passes
# them as build arguments to the same Dockerfile users build:
#   - RUNTIME_IMAGE: a Debian bookworm root filesystem from debootstrap
#     (minbase, trimmed like debian:bookworm-slim), imported with `podman import`;
#     the tarball is cached under $CACHE_DIR, so re-runs skip debootstrap;
#   - the Swift build stage is skipped: `--target prebuilt` copies the binary
#     built on this host (`swift build -c release --static-swift-stdlib`);
#   - or, with --full, SWIFT_IMAGE is a stand-in for the official Swift image:
#     the same Debian base with the toolchain's build dependencies, and this
#     host's toolchain and package mirror mounted read-only into the build
#     (`podman build -v`); the default target then builds as users build it.
#
# Usage: scripts/container-test.sh        (as root; installs podman, runc and
#                                          debootstrap with apt-get if missing)
#        scripts/container-test.sh --full  the default target: the build stage
#                                          compiles the sources (slower)
#        scripts/container-test.sh --rootfs-only   only make (or find) the cached
#                                          rootfs tarball and print its path
# Environment:
#   BALANCER_BINARY   use this binary instead of building one (.build-deploy)
#   CACHE_DIR         where the rootfs tarball is kept
#                     [default: ${XDG_CACHE_HOME:-$HOME/.cache}/swift-balancer]
#   KEEP_IMAGE=1      leave the built image (swift-balancer:container-test-PID)
#   CONTAINER_TEST_UPSTREAMS=0   skip the upstream-mode check
#
# The container runs as deploy/ runs it: read-only root, no capabilities,
# no-new-privileges. Traffic goes to 127.0.0.1 only: the container shares the
# host's network (the only network podman has here) and is told to listen on
# loopback.
# It removes only what it made: its container, its images, its temp dirs.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
started=$(date +%s)
say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || fail "run as root (rootful podman)"
mode=${1:-prebuilt}
case $mode in prebuilt | --full | --rootfs-only) ;; *) fail "unknown argument $mode (--full, --rootfs-only)" ;; esac

cache_dir=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/swift-balancer}
suite=bookworm
rootfs_tar=$cache_dir/debian-$suite-minbase-slim-v2.tar  # bump when the rootfs recipe changes
tag=container-test-$$
base_image=localhost/swift-balancer-base:$suite-slim-$$
image=localhost/swift-balancer:$tag
container=swift-balancer-$tag
# A shorter drain grace than deploy/'s 30 s: the jobs here take under 2 s.
grace_ms=20000
podman_run_flags=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)
# As deploy/ runs it: read-only root (podman adds a tmpfs /tmp, like the
# Kubernetes emptyDir), no capabilities, no privilege escalation.
podman_run_flags+=(--read-only --cap-drop ALL --security-opt no-new-privileges)

work=$(mktemp -d /tmp/balancer-container-test.XXXXXX)
swift_image=localhost/swift-balancer-swift:stand-in-$$
made_base=0 made_swift=0 made_image=0 made_container=0 made_proxy=0
curl_pids=() backend_pids=()
proxy=swift-balancer-$tag-proxy
cleanup() {
    local rc=$?
    set +e
    for pid in "${curl_pids[@]}" "${backend_pids[@]}"; do kill "$pid" 2>/dev/null; done
    if ((made_proxy)); then
        if ((rc != 0)); then
            echo "-- proxy container log (last 30 lines):" >&2
            podman logs "$proxy" 2>&1 | tail -30 >&2
        fi
        podman rm -f -t 0 "$proxy" >/dev/null 2>&1
    fi
    if ((made_container)); then
        if ((rc != 0)); then
            echo "-- container log (last 30 lines):" >&2
            podman logs "$container" 2>&1 | tail -30 >&2
        fi
        podman rm -f -t 0 "$container" >/dev/null 2>&1
    fi
    if ((made_image)) && [[ ${KEEP_IMAGE:-0} != 1 ]]; then podman rmi -f "$image" >/dev/null 2>&1; fi
    if ((made_swift)); then podman rmi -f "$swift_image" >/dev/null 2>&1; fi
    if ((made_base)); then podman rmi -f "$base_image" >/dev/null 2>&1; fi
    # The rootfs tree may hold root-owned device nodes: only our own temp dir is removed.
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- tools
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap curl:curl python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$work/apt.log" 2>&1 \
        || { tail -20 "$work/apt.log" >&2; fail "apt-get install ${missing[*]}"; }
fi

# ---- the runtime base: debootstrap once, then the cached tarball
if [[ ! -s $rootfs_tar ]]; then
    mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "debootstrap --variant=minbase $suite from $mirror (cached in $cache_dir)"
    rootfs=$work/rootfs
    debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
    # Trim it the way debian:bookworm-slim is trimmed (debuerreotype's slim
    # and docker settings): no package lists or caches, no docs, man pages or
    # translations, now or in later installs; apt keeps no .bin caches.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/linda/*
    find "$rootfs"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    # The same package sources the official image has.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    mkdir -p "$cache_dir"
    tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$rootfs"
fi
if [[ $mode == --rootfs-only ]]; then
    # For deploy/systemd/test-unit.sh: make or reuse the tarball, print its path.
    echo "$rootfs_tar"
    exit 0
fi

say "podman import -> $base_image"
podman import -q --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$base_image" >/dev/null
made_base=1

if [[ $mode == --full ]]; then
    # ---- a stand-in for the Swift image: this host's toolchain, mounted at build time
    swift_root=$(dirname "$(dirname "$(dirname "$(readlink -f "$(command -v swift)")")")")
    [[ -x $swift_root/usr/bin/swift ]] || fail "cannot find the Swift toolchain (swift is $(command -v swift))"
    mounts=(-v "$swift_root:$swift_root:ro")
    # Package URLs that git rewrites to a local mirror here (url.X.insteadOf):
    # the same rewrites in the stand-in, and the mirror mounted.
    git_rewrites=""
    while read -r key value; do
        local_base=${key#url.}
        local_base=${local_base%.insteadof}
        [[ -d $local_base ]] || continue
        mounts+=(-v "$local_base:$local_base:ro")
        git_rewrites+=" && git config --system url.$local_base.insteadOf $value"
    done < <(git config --system --get-regexp '^url\..*\.insteadof$' 2>/dev/null | grep ' https://' || true)
    mkdir -p "$work/swift-context"
    {
        echo 'ARG BASE'
        echo 'FROM ${BASE}'
        echo 'RUN apt-get update \'
        echo '    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \'
        echo '        binutils git libc6-dev libcurl4-openssl-dev libedit2 libgcc-12-dev libpython3.11 libsqlite3-0 \'
        echo '        libstdc++-12-dev libxml2-dev libncurses-dev libz3-4 pkg-config tzdata zlib1g-dev unzip ca-certificates \'
        echo "    && rm -rf /var/lib/apt/lists/*$git_rewrites"
        echo "ENV PATH=$swift_root/usr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } >"$work/swift-context/Containerfile"
    say "podman build -> $swift_image (stand-in for the Swift image, $swift_root mounted)"
    made_swift=1
    podman build --isolation chroot --network host --format docker --layers=false --pull=never \
        --build-arg BASE="$base_image" -t "$swift_image" "$work/swift-context" >"$work/swift-image.log" 2>&1 \
        || { tail -30 "$work/swift-image.log" >&2; fail "podman build (Swift stand-in)"; }

    # ---- build the real Dockerfile: default target, the repository as context
    say "podman build -f Dockerfile (default target: swift build in the build stage) -> $image"
    made_image=1
    podman build --isolation chroot --network host --format docker --layers=false --pull=never \
        "${mounts[@]}" \
        --build-arg SWIFT_IMAGE="$swift_image" \
        --build-arg RUNTIME_IMAGE="$base_image" \
        -f "$repo/Dockerfile" -t "$image" "$repo" >"$work/build.log" 2>&1 \
        || { tail -30 "$work/build.log" >&2; fail "podman build"; }
    binary_size=$(podman run --rm "${podman_run_flags[@]}" --entrypoint /usr/bin/du "$image" \
        -h /usr/local/bin/balancer 2>/dev/null | cut -f1)
    binary_note="binary $binary_size, built in the build stage"
else
    # ---- the binary, built on this host
    if [[ -n ${BALANCER_BINARY:-} ]]; then
        binary=$BALANCER_BINARY
    else
        say "swift build -c release --static-swift-stdlib (scratch path .build-deploy)"
        swift build -c release --static-swift-stdlib --scratch-path .build-deploy --product balancer \
            >"$work/swift-build.log" 2>&1 || { tail -30 "$work/swift-build.log" >&2; fail "swift build"; }
        binary=$(swift build -c release --scratch-path .build-deploy --show-bin-path)/balancer
    fi
    [[ -x $binary ]] || fail "no binary at $binary"

    # ---- build the real Dockerfile, target prebuilt
    context=$work/context
    mkdir -p "$context"
    cp -r config "$context/config"
    # Stripped, as the Dockerfile's build stage does (`install -s`): the symbols
    # are a third of an unstripped binary.
    if command -v strip >/dev/null 2>&1; then strip -o "$context/balancer" "$binary"; else cp "$binary" "$context/balancer"; fi
    [[ -f .dockerignore ]] && cp .dockerignore "$context/.dockerignore"
    say "podman build --target prebuilt -f Dockerfile -> $image"
    made_image=1
    podman build --isolation chroot --network host --format docker --layers=false --pull=never \
        --target prebuilt \
        --build-arg RUNTIME_IMAGE="$base_image" \
        --build-arg SWIFT_IMAGE="$base_image" \
        --build-arg PREBUILT_BINARY=balancer \
        -f "$repo/Dockerfile" -t "$image" "$context" >"$work/build.log" 2>&1 \
        || { tail -30 "$work/build.log" >&2; fail "podman build"; }
    binary_note="the stripped binary $(du -h "$context/balancer" | cut -f1)"
fi
size_bytes=$(podman image inspect --format '{{.Size}}' "$image")
size_human=$(podman images --format '{{.Size}}' "$image" | head -1)
say "image size: $size_human ($size_bytes bytes; $binary_note)"

# ---- run it
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base_url=http://127.0.0.1:$port
say "podman run on 127.0.0.1:$port"
made_container=1
# (Without systemd, podman logs that it cannot add a healthcheck timer: that
# timer only schedules the check; `podman healthcheck run` below runs it.)
podman run -d --name "$container" "${podman_run_flags[@]}" \
    -e BALANCER_HOST=127.0.0.1 -e BALANCER_PORT="$port" -e BALANCER_GRACE_PERIOD_MS=$grace_ms \
    "$image" >/dev/null 2>"$work/run.log" || { cat "$work/run.log" >&2; fail "podman run"; }
for _ in $(seq 1 100); do
    curl -fsS -m 1 "$base_url/readyz" >/dev/null 2>&1 && break
    [[ $(podman inspect --format '{{.State.Running}}' "$container") == true ]] || fail "container exited"
    sleep 0.2
done
curl -fsS -m 2 "$base_url/readyz" >/dev/null || fail "GET /readyz: not ready within 20 s"

# /jobs and /stats
answer=$(curl -fsS -m 5 -H 'Content-Type: application/json' -d '{"op":"multiply","x":6,"y":7}' "$base_url/jobs") \
    || fail "POST /jobs"
grep -q '"result" *: *42' <<<"$answer" || fail "POST /jobs answered $answer"
stats=$(curl -fsS -m 5 "$base_url/stats") || fail "GET /stats"
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert isinstance(d, dict) and d' "$stats" \
    || fail "GET /stats is not a JSON object: $stats"
say "ok: POST /jobs -> 42, GET /stats -> JSON"

# not root: from inside (id -u) and from the host (/proc/PID/status)
uid_inside=$(podman exec "$container" id -u)
pid=$(podman inspect --format '{{.State.Pid}}' "$container")
uid_host=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[[ $uid_inside != 0 && $uid_host != 0 ]] || fail "runs as root (id -u $uid_inside, host uid $uid_host)"
comm=$(cat "/proc/$pid/comm")
[[ $comm == balancer ]] || fail "PID 1 is $comm, not balancer"
say "ok: PID 1 is balancer, uid $uid_inside (host /proc: $uid_host)"

# the HEALTHCHECK from the image, as podman runs it
# (Output captured before grep: `grep -q` quits at the first match, and with
# pipefail the writer's SIGPIPE would fail the pipeline.)
healthcheck_json=$(podman inspect --format '{{json .Config.Healthcheck}}' "$container")
grep -q 'balancer' <<<"$healthcheck_json" \
    || fail "the image has no HEALTHCHECK (built without --format docker?)"
podman healthcheck run "$container" >"$work/health.log" 2>&1 \
    || { cat "$work/health.log" >&2; fail "HEALTHCHECK"; }
say "ok: HEALTHCHECK ($(podman inspect --format '{{json .Config.Healthcheck.Test}}' "$container")) passes"

# podman stop while jobs are in flight: every job answered 200, exit 0
jobs_in_flight=8
for i in $(seq 1 $jobs_in_flight); do
    ms=$((1000 + 125 * i))   # 1.1 to 2 s
    curl -sS -m 30 -o "$work/job$i.body" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d "{\"op\":\"sleep\",\"ms\":$ms}" "$base_url/jobs" >"$work/job$i.code" 2>"$work/job$i.err" &
    curl_pids+=($!)
done
# Stop only once the server holds them all (bounded: 5 s).
for _ in $(seq 1 50); do
    n=$(curl -fsS -m 1 "$base_url/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["in_flight"])' 2>/dev/null || echo 0)
    ((n >= jobs_in_flight)) && break
    sleep 0.1
done
((n >= jobs_in_flight)) || fail "only $n of $jobs_in_flight jobs reached the server"
say "podman stop with $n jobs in flight"
t0=$(date +%s.%N)
podman stop -t $((grace_ms / 1000 + 10)) "$container" >/dev/null 2>>"$work/run.log"
t1=$(date +%s.%N)
for pid in "${curl_pids[@]}"; do wait "$pid" || true; done
curl_pids=()
bad=0
for i in $(seq 1 $jobs_in_flight); do
    code=$(cat "$work/job$i.code")
    if [[ $code != 200 ]]; then
        echo "job $i: HTTP $code $(cat "$work/job$i.body" "$work/job$i.err")" >&2
        bad=$((bad + 1))
    fi
done
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
podman logs "$container" >"$work/container.log" 2>&1
grep -q 'draining' "$work/container.log" || fail "the log shows no drain after SIGTERM"
((bad == 0)) || fail "$bad of $jobs_in_flight in-flight jobs were not answered 200"
[[ $exit_code == 0 ]] || fail "exit code after podman stop: $exit_code"
say "ok: all $jobs_in_flight in-flight jobs answered 200; exit 0 after a $(python3 -c "print(f'{$t1 - $t0:.1f}')") s drain"

# In front of upstreams, as deploy/docker-compose.yml runs it: `serve
# --upstream http://backend1:PORT --upstream http://backend2:PORT`, with the
# two names resolving (--add-host) to two small HTTP servers on the host's
# loopback, each serving a page that names it.
if [[ ${CONTAINER_TEST_UPSTREAMS:-1} == 1 ]]; then
    ports=()
    for b in 1 2; do
        mkdir -p "$work/backend$b"
        echo "backend$b" >"$work/backend$b/index.html"
        ports+=("$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')")
        python3 -m http.server "${ports[b - 1]}" --bind 127.0.0.1 --directory "$work/backend$b" \
            >"$work/backend$b.log" 2>&1 &
        backend_pids+=($!)
    done
    proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    say "upstream mode: podman run ... serve --upstream http://backend1:${ports[0]} --upstream http://backend2:${ports[1]}"
    made_proxy=1
    podman run -d --name "$proxy" "${podman_run_flags[@]}" \
        --add-host backend1:127.0.0.1 --add-host backend2:127.0.0.1 \
        -e BALANCER_HOST=127.0.0.1 -e BALANCER_PORT="$proxy_port" \
        "$image" serve --upstream "http://backend1:${ports[0]}" --upstream "http://backend2:${ports[1]}" \
        >/dev/null 2>>"$work/run.log" || { cat "$work/run.log" >&2; fail "podman run (upstream mode)"; }
    for _ in $(seq 1 100); do
        curl -fsS -m 1 "http://127.0.0.1:$proxy_port/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    curl -fsS -m 2 "http://127.0.0.1:$proxy_port/readyz" >/dev/null || fail "upstream mode: not ready within 20 s"
    : >"$work/proxied"
    for _ in $(seq 1 20); do
        curl -fsS -m 5 "http://127.0.0.1:$proxy_port/index.html" >>"$work/proxied" 2>>"$work/proxied.err" \
            || fail "upstream mode: GET /index.html failed: $(tail -1 "$work/proxied.err")"
    done
    n1=$(grep -c '^backend1$' "$work/proxied" || true)
    n2=$(grep -c '^backend2$' "$work/proxied" || true)
    ((n1 + n2 == 20)) || fail "upstream mode: unexpected bodies: $(sort "$work/proxied" | uniq -c | tr '\n' ' ')"
    ((n1 > 0 && n2 > 0)) || fail "upstream mode: 20 requests reached only one backend ($n1 / $n2)"
    podman stop -t 10 "$proxy" >/dev/null 2>>"$work/run.log"
    proxy_exit=$(podman inspect --format '{{.State.ExitCode}}' "$proxy")
    [[ $proxy_exit == 0 ]] || fail "upstream mode: exit code after podman stop: $proxy_exit"
    say "ok: 20 GETs proxied by name to backend1 ($n1) and backend2 ($n2); exit 0 on stop"
fi

say "image size: $size_human"
say "container test passed in $(($(date +%s) - started)) s"
