#!/usr/bin/env bash
# auth.mode "none" vs "jwt" (ES256), interleaved (docs/benchmarks.md,
# "Authentication"): fan-out to 1,000 subscribers at max rate and at a
# fixed 2,000 msg/s, and 5,000 new connections each presenting the token.
# Both modes get the same token (mode none ignores it), so the difference
# is verification and the permission checks.
#   cargo build --release && benches/auth_ab.sh [RUNS]
# SCENARIOS (default "fanoutmax fanoutrate connect") picks the scenarios,
# RATE (default 1000) the fixed publish rate of fanoutrate, CONNS (default
# 5000) the connections of connect.
# Needs openssl and python3 with `cryptography` (to mint the token).
# Everything talks to 127.0.0.1 only; every run stops by itself.
set -u
RUNS=${1:-3}
SCENARIOS=${SCENARIOS:-fanoutmax fanoutrate connect}
RATE=${RATE:-1000}
CONNS=${CONNS:-5000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/wsbroker
WORK=$(mktemp -d)
PID=
trap 'kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out signer.pem 2>/dev/null
openssl pkey -in signer.pem -pubout -out signer.pub.pem
TOKEN=$(python3 - <<'PY'
import base64, json, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
key = serialization.load_pem_private_key(open("signer.pem", "rb").read(), None)
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
msg = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(
    {"sub": "bench", "exp": int(time.time()) + 86400,
     "wsbroker": {"subscribe": ["bench.>"], "publish": ["bench.>"]}}).encode())
r, s = utils.decode_dss_signature(key.sign(msg.encode(), ec.ECDSA(hashes.SHA256())))
print(msg + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big")))
PY
)
cat > bench.toml <<TOML
[server]
listen = "127.0.0.1:8443"
max_connections = 19000
[connection]
max_inbound_rate = 0
max_subscriptions = 1000
[origins]
allow = ["http://localhost:*"]
[admin]
listen = "127.0.0.1:9090"
[log]
level = "warn"
[auth]
public_keys = ["$WORK/signer.pub.pem"]
TOML
start_server() { # mode
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  rm -f wsbroker-dev-cert.pem
  WSBROKER__AUTH__MODE=$1 "$BIN" serve --dev --config bench.toml 2>serve.log &
  PID=$!
  for _ in $(seq 100); do
    [ -s wsbroker-dev-cert.pem ] && (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break
    sleep 0.1
  done
  sleep 0.5
}
bench() { # name, mode, bench args...
  local name=$1 mode=$2; shift 2
  local r
  r=$("$BIN" bench --url wss://127.0.0.1:8443/ws --ca wsbroker-dev-cert.pem \
      --origin http://localhost:1 --token "$TOKEN" --server-pid "$PID" "$@" 2>/dev/null) || return
  echo "{\"scenario\":\"$name\",\"mode\":\"$mode\",\"report\":$r}" >> results.jsonl
}
for _ in $(seq "$RUNS"); do
  for mode in none jwt; do
    for sc in $SCENARIOS; do
      start_server "$mode"
      case $sc in
        fanoutmax) bench fanoutmax "$mode" --subscribers 1000 --rate max --payload 64 --duration 10s ;;
        fanoutrate) bench fanoutrate "$mode" --subscribers 1000 --rate "$RATE" --payload 64 --duration 10s ;;
        connect) bench connect "$mode" --connections-only "$CONNS" --hold 1s ;;
      esac
    done
  done
done
python3 - results.jsonl <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:  # server CPU per delivery, per connection
    rep = r["report"]
    if rep.get("delivered") and rep.get("server_cpu_seconds") is not None:
        rep["server_cpu_us_per_delivery"] = rep["server_cpu_seconds"] * 1e6 / rep["delivered"]
    if rep.get("connections") and rep.get("connect_server_cpu_seconds") is not None:
        rep["server_cpu_us_per_connection"] = rep["connect_server_cpu_seconds"] * 1e6 / rep["connections"]
def med(scenario, mode, key):
    v = [r["report"].get(key) for r in rows if r["scenario"] == scenario and r["mode"] == mode]
    v = [x for x in v if x is not None]
    return (statistics.median(v), v) if v else (float("nan"), v)
for scenario, keys in [("fanoutmax", ["deliveries_per_s", "server_cpu_us_per_delivery", "lost"]),
                       ("fanoutrate", ["deliveries_per_s", "server_cpu_us_per_delivery", "lost"]),
                       ("connect", ["connect_per_s", "server_cpu_us_per_connection",
                                    "connect_client_cpu_seconds", "connect_errors"])]:
    if not any(r["scenario"] == scenario for r in rows):
        continue
    for key in keys:
        (a, av), (b, bv) = med(scenario, "none", key), med(scenario, "jwt", key)
        ratio = b / a if a else float("nan")
        fmt = lambda v: [round(x, 3) for x in v]
        print(f"{scenario:11} {key:29} none {a:12.3f} jwt {b:12.3f} jwt/none {ratio:.3f}  none={fmt(av)} jwt={fmt(bv)}")
PY
