#!/usr/bin/env bash
# Runs the docs/benchmarks.md scenarios against a local release build and
# prints one summary line per scenario (medians of RUNS runs).
#   cargo build --release && benches/scenarios.sh [RUNS]
# Everything talks to 127.0.0.1 only; every run stops by itself.
set -u
RUNS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/wsbroker
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK"
cat > bench.toml <<'TOML'
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
TOML
PID=
start_server() { # extra env assignments
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  env "$@" "$BIN" serve --dev --config bench.toml 2>serve.log &
  PID=$!
  for _ in $(seq 100); do
    [ -s wsbroker-dev-cert.pem ] && (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break
    sleep 0.1
  done
  sleep 0.5
}
bench() { # scenario name, bench args...
  local name=$1; shift
  local r
  r=$("$BIN" bench --url wss://127.0.0.1:8443/ws --ca wsbroker-dev-cert.pem \
      --origin http://localhost:1 --server-pid "$PID" "$@" 2>/dev/null) || return
  echo "{\"scenario\":\"$name\",\"report\":$r}" >> results.jsonl
}
for _ in $(seq "$RUNS"); do
  rm -f wsbroker-dev-cert.pem
  start_server
  bench latency200 --subscribers 1000 --rate 200 --payload 64 --duration 10s
  for rate in 1000 2000 3000; do
    bench "fanout$rate" --subscribers 1000 --rate "$rate" --payload 64 --duration 10s
  done
  bench fanoutmax --subscribers 1000 --rate max --payload 64 --duration 10s
  start_server WSBROKER_DISABLE_METRICS=1
  bench fanout2000_nometrics --subscribers 1000 --rate 2000 --payload 64 --duration 10s
  bench fanoutmax_nometrics --subscribers 1000 --rate max --payload 64 --duration 10s
  start_server
  bench manytopics --subscribers 10000 --topics 10000 --wildcard-subscribers 1000 \
      --publishers 10 --rate max --payload 64 --duration 10s
  for extra in 0 9 99; do
    start_server
    bench "scale_subs$((1000 * (extra + 1)))" --subscribers 1000 --topics 1000 \
        --publishers 10 --rate max --extra-subscriptions "$extra" --payload 64 --duration 10s
  done
  start_server
  bench idle15k --connections-only 15000 --hold 5s
done
python3 "$ROOT/benches/summarize.py" results.jsonl
