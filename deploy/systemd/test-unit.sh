#!/usr/bin/env bash
# Runs deploy/systemd/balancer.service under a real systemd and checks it:
# the hardened service starts (DynamicUser, seccomp, no capabilities, ...),
# reads the optional EnvironmentFile, answers, and `systemctl stop` drains the
# jobs in flight and ends with exit status 0 (Result=success).
#
# This machine has no systemd as PID 1, so the unit runs in a podman
# container whose PID 1 is systemd (`--systemd=always`): the Debian bookworm
# root filesystem that scripts/container-test.sh makes (and caches), plus
# systemd, the binary at the unit's ExecStart path, and the unit file
# unchanged.
#
# Usage: deploy/systemd/test-unit.sh     (as root; BALANCER_BINARY to skip the build)
# Traffic: 127.0.0.1 only, on a free port; removes only what it made.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
started=$(date +%s)
say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || fail "run as root (rootful podman)"

tag=unit-test-$$
base_image=localhost/swift-balancer-base:systemd-$$
image=localhost/swift-balancer-systemd:$tag
container=swift-balancer-$tag
work=$(mktemp -d /tmp/balancer-unit-test.XXXXXX)
made_base=0 made_image=0 made_container=0
curl_pids=()
cleanup() {
    local rc=$?
    set +e
    for pid in "${curl_pids[@]}"; do kill "$pid" 2>/dev/null; done
    if ((made_container)); then
        if ((rc != 0)); then
            echo "-- journal of balancer.service (last 30 lines):" >&2
            podman exec "$container" journalctl -u balancer --no-pager 2>&1 | tail -30 >&2
        fi
        podman rm -f -t 0 "$container" >/dev/null 2>&1
    fi
    if ((made_image)); then podman rmi -f "$image" >/dev/null 2>&1; fi
    if ((made_base)); then podman rmi -f "$base_image" >/dev/null 2>&1; fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The root filesystem (and podman, runc, debootstrap) via container-test.sh.
rootfs_tar=$(scripts/container-test.sh --rootfs-only | tail -1)
[[ -s $rootfs_tar ]] || fail "no root filesystem tarball"

if [[ -n ${BALANCER_BINARY:-} ]]; then
    binary=$BALANCER_BINARY
else
    say "swift build -c release --static-swift-stdlib (scratch path .build-deploy)"
    swift build -c release --static-swift-stdlib --scratch-path .build-deploy --product balancer \
        >"$work/swift-build.log" 2>&1 || { tail -30 "$work/swift-build.log" >&2; fail "swift build"; }
    binary=$(swift build -c release --scratch-path .build-deploy --show-bin-path)/balancer
fi
[[ -x $binary ]] || fail "no binary at $binary"

# ---- an image with systemd as PID 1 and the unit as shipped
unit=deploy/systemd/balancer.service
exec_path=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
mkdir -p "$work/context"
strip -o "$work/context/balancer" "$binary" 2>/dev/null || cp "$binary" "$work/context/balancer"
cp "$unit" "$work/context/balancer.service"
cat >"$work/context/Containerfile" <<EOF
ARG BASE
FROM \${BASE}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd systemd-sysv \\
    && rm -rf /var/lib/apt/lists/*
COPY balancer $exec_path
COPY balancer.service /etc/systemd/system/balancer.service
RUN systemctl enable balancer.service && mkdir -p /etc/balancer
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
EOF
podman import -q "$rootfs_tar" "$base_image" >/dev/null
made_base=1
say "podman build (bookworm + systemd + $exec_path + $unit)"
made_image=1
podman build --isolation chroot --network host --format docker --layers=false --pull=never \
    --build-arg BASE="$base_image" -t "$image" "$work/context" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; fail "podman build"; }

# ---- boot it; the EnvironmentFile sets the port
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base_url=http://127.0.0.1:$port
printf 'BALANCER_PORT=%s\nBALANCER_LOG_LEVEL=info\n' "$port" >"$work/balancer.env"
say "boot systemd in a container; balancer.service on 127.0.0.1:$port"
made_container=1
podman run -d --name "$container" --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    --network host --systemd=always -v "$work/balancer.env:/etc/balancer/balancer.env:ro" \
    "$image" >/dev/null 2>"$work/run.log" || { cat "$work/run.log" >&2; fail "podman run"; }
for _ in $(seq 1 100); do
    curl -fsS -m 1 "$base_url/readyz" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fsS -m 2 "$base_url/readyz" >/dev/null || fail "balancer.service not ready within 20 s"
answer=$(curl -fsS -m 5 -d '{"op":"multiply","x":6,"y":7}' "$base_url/jobs") || fail "POST /jobs"
grep -q '"result" *: *42' <<<"$answer" || fail "POST /jobs answered $answer"
say "ok: active, POST /jobs -> 42 on the port from the EnvironmentFile"

# ---- the sandbox as the kernel sees it
main_pid=$(podman exec "$container" systemctl show balancer -p MainPID --value)
status=$(podman exec "$container" cat "/proc/$main_pid/status")
uid=$(awk '/^Uid:/ {print $2}' <<<"$status")
cap_eff=$(awk '/^CapEff:/ {print $2}' <<<"$status")
cap_bnd=$(awk '/^CapBnd:/ {print $2}' <<<"$status")
nnp=$(awk '/^NoNewPrivs:/ {print $2}' <<<"$status")
seccomp=$(awk '/^Seccomp:/ {print $2}' <<<"$status")
[[ $uid != 0 ]] || fail "runs as root"
[[ $cap_eff == 0000000000000000 && $cap_bnd == 0000000000000000 ]] || fail "capabilities: eff $cap_eff bnd $cap_bnd"
[[ $nnp == 1 ]] || fail "NoNewPrivs is $nnp"
[[ $seccomp == 2 ]] || fail "no seccomp filter (Seccomp: $seccomp)"
# ProtectSystem=strict: the whole tree is mounted read-only for the service
# (field 6 of /proc/PID/mountinfo holds the mount options; field 5 the path).
root_opts=$(podman exec "$container" awk '$5 == "/" {print $6}' "/proc/$main_pid/mountinfo" | tail -1)
[[ $root_opts == ro* ]] || fail "/ is not read-only for the service (ProtectSystem=strict): $root_opts"
# ProtectHome=yes: /root is inaccessible (an empty, mode 000 mount).
home_mode=$(podman exec "$container" stat -c %a "/proc/$main_pid/root/root" 2>/dev/null || echo "?")
[[ $home_mode == 0 ]] || fail "/root is visible to the service (ProtectHome): mode $home_mode"
say "ok: dynamic uid $uid, no capabilities, NoNewPrivs, seccomp filter, read-only /, no /root"

# ---- systemctl stop with jobs in flight
jobs_in_flight=6
for i in $(seq 1 $jobs_in_flight); do
    curl -sS -m 30 -o "$work/job$i.body" -w '%{http_code}' -d "{\"op\":\"sleep\",\"ms\":$((1000 + 150 * i))}" \
        "$base_url/jobs" >"$work/job$i.code" 2>"$work/job$i.err" &
    curl_pids+=($!)
done
n=0
for _ in $(seq 1 50); do
    n=$(curl -fsS -m 1 "$base_url/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["in_flight"])' 2>/dev/null || echo 0)
    ((n >= jobs_in_flight)) && break
    sleep 0.1
done
((n >= jobs_in_flight)) || fail "only $n of $jobs_in_flight jobs reached the service"
say "systemctl stop balancer with $n jobs in flight"
t0=$(date +%s.%N)
podman exec "$container" timeout 60 systemctl stop balancer
t1=$(date +%s.%N)
for pid in "${curl_pids[@]}"; do wait "$pid" || true; done
curl_pids=()
bad=0
for i in $(seq 1 $jobs_in_flight); do
    code=$(cat "$work/job$i.code")
    [[ $code == 200 ]] || { echo "job $i: HTTP $code $(cat "$work/job$i.body" "$work/job$i.err")" >&2; bad=$((bad + 1)); }
done
((bad == 0)) || fail "$bad of $jobs_in_flight in-flight jobs were not answered 200"
result=$(podman exec "$container" systemctl show balancer -p Result --value)
exit_status=$(podman exec "$container" systemctl show balancer -p ExecMainStatus --value)
[[ $result == success && $exit_status == 0 ]] || fail "after stop: Result=$result ExecMainStatus=$exit_status"
say "ok: all $jobs_in_flight jobs answered 200; Result=success, exit 0, after a $(python3 -c "print(f'{$t1 - $t0:.1f}')") s drain"
say "unit test passed in $(($(date +%s) - started)) s"
