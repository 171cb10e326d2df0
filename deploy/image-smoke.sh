#!/usr/bin/env bash
# Build the container image from the real Dockerfile and run it, without Docker or a registry.
#
#   bash deploy/image-smoke.sh        (as root; .ci/run calls it)
#
# Registry base images cannot be pulled on the CI machines, so the base the Dockerfile names
# (python:3.11-slim-bookworm) is a stand-in made from Debian packages with mmdebstrap and
# imported into a private buildah store; the Dockerfile itself is built unchanged
# (buildah bud --isolation chroot --format docker: the OCI format drops HEALTHCHECK). pip inside
# the build uses this machine's pip configuration and CA bundle as read-only build-time mounts,
# so nothing of them lands in the image.
#
# Then, against a fake upstream on loopback: the image runs as uid 10001, answers DNS, /healthz
# and /readyz, honours DNS_SIDECAR_* settings, its HEALTHCHECK command exits 0 inside the
# container, it holds no compiler and no pip cache, and SIGTERM exits 0 within lameduck + drain.
# Warm restart: the container runs with --cache-file on a volume; after SIGTERM the fake upstream
# is stopped and the container started again, and the name resolved before is answered from
# the snapshot (no upstream could answer it), with a TTL that did not grow. Fleet cache (where
# redis-server is installed): the first run writes to a redis-server on loopback, and a third,
# fresh container with no snapshot and the upstream gone answers the name from it. Prints the image size. Without buildah/mmdebstrap (and no apt-get to install them) it prints
# one "skipped" line and exits 0. Every address used is on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'image-smoke: %s\n' "$*"; }

if ! command -v buildah >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap) \
      >/dev/null 2>&1 || true
  fi
fi
if ! command -v buildah >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then
  say "skipped: buildah and mmdebstrap are needed (Debian packages) and could not be installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "skipped: needs root (mmdebstrap and buildah's chroot isolation)"
  exit 0
fi

PY=${PYTHON:-python3}
work=$(mktemp -d)
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
bh() { buildah --root "$work/store" --runroot "$work/run" "$@"; }
pids=()
# wait_api PATH SECONDS LOG: until the container's API answers PATH with 200 (else FAIL and LOG).
wait_api() {
  "$PY" - "$http_port" "$1" "$2" <<'PY' || { cat "$3"; exit 1; }
import sys, time, urllib.request
port, path, limit = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + limit
while True:
    try:
        if opener.open(f"http://127.0.0.1:{port}{path}", timeout=1).status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit(f"image-smoke: FAIL: {path} never answered 200 within {limit:g} s")
    time.sleep(0.2)
PY
}
# The DNS checks below ask the container with smoke_dns.ask(port, name, timeout): (query,
# reply) of NAME A over UDP, parsed with dnslib; smoke_py runs "$PY" where it imports.
cat >"$work/smoke_dns.py" <<'PY'
import socket
from dnslib import DNSRecord

def ask(port, name="www.example.test", timeout=10.0):
    q = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.pack(), ("127.0.0.1", port))
        return q, DNSRecord.parse(s.recv(4096))
PY
smoke_py() { PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$@"; }
# stop_sidecar WHAT LOG: SIGTERM the running container's sidecar; it must exit 0.
stop_sidecar() {
  kill -TERM "$(pgrep -n -f "python[0-9.]* /usr/local/bin/dns-sidecar")"
  rc=0; wait "$runner" || rc=$?
  [ "$rc" = 0 ] || { say "FAIL: SIGTERM $1: exit code $rc"; cat "$2"; exit 1; }
}
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  bh rm --all >/dev/null 2>&1 || true
  bh rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. The stand-in base image.
t0=$(date +%s)
# python3-dev: the real python:3.11-slim image ships Python's headers, which the build stage
# needs to compile the UDP fast path.
mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,python3-venv,python3-dev,ca-certificates \
  --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
  --customize-hook='ln -sf /usr/bin/python3 "$1"/usr/local/bin/python; ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip' \
  bookworm "$work/base.tar" >"$work/mmdebstrap.log" 2>&1 || { tail -20 "$work/mmdebstrap.log"; exit 1; }
ctr=$(bh from scratch)
bh add --quiet "$ctr" "$work/base.tar" / >/dev/null
bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 "$ctr"
bh commit --quiet "$ctr" localhost/python:3.11-slim-bookworm >/dev/null
bh rm "$ctr" >/dev/null
rm -f "$work/base.tar"
say "stand-in base built in $(( $(date +%s) - t0 )) s"

# 2. The image, from the Dockerfile as it is.
mounts=()
for f in /etc/pip.conf /etc/xdg/pip /opt/wheels "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$f" ] && [ -e "$f" ]; then mounts+=(--volume "$f:$f:ro"); fi
done
t0=$(date +%s)
bh bud --quiet --pull-never --format docker --isolation chroot "${mounts[@]}" \
  -t localhost/dns-sidecar:smoke . >"$work/bud.log" 2>&1 || { tail -30 "$work/bud.log"; exit 1; }
say "image built in $(( $(date +%s) - t0 )) s"
bh inspect localhost/dns-sidecar:smoke >"$work/inspect.json"
user=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["Docker"]["config"].get("User"))' "$work/inspect.json")
health=$("$PY" -c 'import json,sys; print(json.dumps((json.load(open(sys.argv[1]))["Docker"]["config"].get("Healthcheck") or {}).get("Test")))' "$work/inspect.json")
[ "$user" = "10001:10001" ] || { say "FAIL: image user is '$user', expected 10001:10001"; exit 1; }
[ "$health" != "null" ] || { say "FAIL: the image has no HEALTHCHECK"; exit 1; }

# 3. Run it beside a fake upstream on loopback.
ports=$("$PY" - <<'PY'
import socket
out = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); out.append(s.getsockname()[1]); s.close()
print(*out)
PY
)
read -r up_port dns_port http_port <<<"$ports"
redis_port=""
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
  redis_port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
    --daemonize no >"$work/redis.log" 2>&1 & pids+=("$!")
fi
"$PY" -m sidecar.testing.fakeupstream --port "$up_port" >"$work/upstream.log" 2>&1 & upstream=$!
pids+=("$upstream")
# The snapshot's volume, writable by the image's user only (as an emptyDir or hostPath is).
mkdir -m 0700 "$work/cache" && chown 10001:10001 "$work/cache"
cache_vol=(--volume "$work/cache:/var/cache/dns-sidecar")

ctr=$(bh from --pull-never localhost/dns-sidecar:smoke)
run_env=(-e DNS_SIDECAR_LISTEN=127.0.0.1:"$dns_port" -e DNS_SIDECAR_HTTP=127.0.0.1:"$http_port"
         -e DNS_SIDECAR_UPSTREAM=127.0.0.1:"$up_port" -e DNS_SIDECAR_MIN_TTL=777
         -e DNS_SIDECAR_LAMEDUCK=1 -e DNS_SIDECAR_CACHE_FILE=/var/cache/dns-sidecar/cache.snap)
shared_env=()
[ -z "$redis_port" ] || shared_env=(-e DNS_SIDECAR_SHARED_CACHE=redis://127.0.0.1:"$redis_port")
uid=$(bh run "${run_env[@]}" "$ctr" -- id -u)
[ "$uid" = 10001 ] || { say "FAIL: runs as uid $uid"; exit 1; }
if bh run "$ctr" -- sh -c 'command -v gcc || command -v cc || command -v make || ls -d /root/.cache/pip /home/*/.cache/pip' >/dev/null 2>&1; then
  say "FAIL: the image holds a compiler, make or a pip cache"; exit 1
fi
bh run "${run_env[@]}" "${shared_env[@]}" "${cache_vol[@]}" "$ctr" -- dns-sidecar >"$work/sidecar.log" 2>&1 & runner=$!

wait_api /healthz 30 "$work/sidecar.log"
wait_api /readyz 10 "$work/sidecar.log"
smoke_py - "$dns_port" "$http_port" "$work/ttl" <<'PY' || { cat "$work/sidecar.log"; exit 1; }
import json, sys, urllib.request
from smoke_dns import ask
dns_port, http_port = int(sys.argv[1]), int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
q, r = ask(dns_port, timeout=5)
assert r.header.id == q.header.id and r.header.rcode == 0 and r.rr, r
ttl = r.rr[0].ttl
assert ttl >= 770, f"image-smoke: FAIL: DNS_SIDECAR_MIN_TTL=777 not honoured (TTL {ttl})"
open(sys.argv[3], "w").write(str(ttl))
stats = json.load(opener.open(f"http://127.0.0.1:{http_port}/stats", timeout=2))
print(f"image-smoke: DNS answered ({r.rr[0].rdata}, TTL {ttl}), /healthz and /readyz 200,"
      f" {stats['queries']['total']} queries in /stats")
PY

# The HEALTHCHECK command itself, inside the running container's image and environment.
mapfile -t hc < <("$PY" -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])[1:]))' "$health")
bh run "${run_env[@]}" "$ctr" -- "${hc[@]}" || { say "FAIL: HEALTHCHECK exited $?"; exit 1; }
say "HEALTHCHECK command exited 0 inside the container"

# SIGTERM: exit 0 within lameduck (1 s) + drain (5 s) + start-up slack.
pid=$(pgrep -n -f "python[0-9.]* /usr/local/bin/dns-sidecar")
t0=$(date +%s.%N)
kill -TERM "$pid"
rc=0; wait "$runner" || rc=$?
took=$("$PY" -c "import sys; print(round($(date +%s.%N) - $t0, 2))")
[ "$rc" = 0 ] || { say "FAIL: SIGTERM exit code $rc"; cat "$work/sidecar.log"; exit 1; }
"$PY" -c "import sys; sys.exit(0 if $took <= 8 else 1)" || { say "FAIL: SIGTERM took ${took}s"; exit 1; }
say "SIGTERM: exit 0 after ${took}s (lameduck 1 s)"
grep -q "udp path compiled" "$work/sidecar.log" || {
  say "FAIL: the image does not run the compiled UDP fast path"; cat "$work/sidecar.log"; exit 1; }
say "the image runs the compiled UDP fast path"
if bh run "${run_env[@]}" "$ctr" -- "${hc[@]}" >/dev/null 2>&1; then
  say "FAIL: HEALTHCHECK passes with the sidecar stopped"; exit 1
fi

# Warm restart: the snapshot written at SIGTERM is on the volume; with the upstream gone, the
# restarted container can answer the name only from it.
[ -s "$work/cache/cache.snap" ] || { say "FAIL: no snapshot on the volume after SIGTERM"; cat "$work/sidecar.log"; exit 1; }
snap_owner=$(stat -c %u "$work/cache/cache.snap")
[ "$snap_owner" = 10001 ] || { say "FAIL: snapshot owned by uid $snap_owner"; exit 1; }
kill "$upstream"; wait "$upstream" 2>/dev/null || true
bh run "${run_env[@]}" "${cache_vol[@]}" "$ctr" -- dns-sidecar >"$work/sidecar2.log" 2>&1 & runner=$!
wait_api /healthz 30 "$work/sidecar2.log"
smoke_py - "$dns_port" "$work/ttl" <<'PY' || { cat "$work/sidecar2.log"; exit 1; }
import sys
from smoke_dns import ask
dns_port, before = int(sys.argv[1]), int(open(sys.argv[2]).read())

_, r = ask(dns_port)
assert r.header.rcode == 0 and r.rr, f"image-smoke: FAIL: not answered from the snapshot: {r}"
assert r.rr[0].ttl <= before, f"image-smoke: FAIL: TTL grew from {before} to {r.rr[0].ttl}"
# A name never asked before fails: nothing upstream could have answered the first one.
assert ask(dns_port, "mail.example.test")[1].header.rcode != 0, \
    "image-smoke: FAIL: the upstream still answers"
print(f"image-smoke: after a restart with the upstream gone, answered from the snapshot"
      f" (TTL {before} -> {r.rr[0].ttl}); a new name fails as it should")
PY
grep -q "entries loaded" "$work/sidecar2.log" || { say "FAIL: no snapshot load logged"; cat "$work/sidecar2.log"; exit 1; }
stop_sidecar "after the restart" "$work/sidecar2.log"
say "warm restart: the cache survived the container's restart on its volume"

# Fleet cache: a fresh container (no snapshot) with the upstream still gone answers the name
# the first one wrote to the shared cache.
if [ -n "$redis_port" ]; then
  [ -n "$(redis-cli -p "$redis_port" --scan --pattern 'dns-sidecar:v1:*' | head -1)" ] || {
    say "FAIL: the first container wrote nothing to the shared cache"; cat "$work/sidecar.log"; exit 1; }
  fresh_env=()
  for e in "${run_env[@]}"; do
    [[ "$e" == -e || "$e" == DNS_SIDECAR_CACHE_FILE=* ]] || fresh_env+=(-e "$e")
  done
  bh run "${fresh_env[@]}" "${shared_env[@]}" "$ctr" -- dns-sidecar >"$work/sidecar3.log" 2>&1 & runner=$!
  wait_api /readyz 30 "$work/sidecar3.log"
  smoke_py - "$dns_port" "$http_port" <<'PY' || { cat "$work/sidecar3.log"; exit 1; }
import json, sys, urllib.request
from smoke_dns import ask
dns_port, http_port = int(sys.argv[1]), int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_, r = ask(dns_port)
assert r.header.rcode == 0 and r.rr, f"image-smoke: FAIL: not answered from the shared cache: {r}"
shared = json.load(opener.open(f"http://127.0.0.1:{http_port}/stats", timeout=2))["shared_cache"]
assert shared["hits"] >= 1 and shared["state"] == "closed", shared
print(f"image-smoke: a fresh container answered from the fleet cache ({shared['hits']} shared hit,"
      f" notices live: {shared['notices']['live']})")
PY
  stop_sidecar "(fleet cache run)" "$work/sidecar3.log"
else
  say "fleet cache step skipped: redis-server is not installed"
fi

size=$(bh images --format '{{.Size}}' localhost/dns-sidecar:smoke)
base=$(bh images --format '{{.Size}}' localhost/python:3.11-slim-bookworm)
say "image size $size on a stand-in base of $base (python3-pip from Debian makes the stand-in larger than the real slim base)"
say "OK"
