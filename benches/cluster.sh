#!/usr/bin/env bash
# Cross-node fan-out (docs/benchmarks.md, "Cluster"): nats-server + 2 nodes,
# subscribers split over both (bench with two --url), against one node with
# the same load, interleaved in one session. Prints one JSON line per run.
#   cargo build --release && benches/cluster.sh [RUNS] [RATES...]
# Everything talks to 127.0.0.1 only; every process is stopped by pid.
set -u
RUNS=${1:-3}
shift || true
RATES=${*:-1000 2000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/wsbroker
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$WORK"' EXIT
cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
    -addext 'basicConstraints=critical,CA:FALSE' \
    -keyout key.pem -out cert.pem 2>/dev/null
node_toml() { # name wss-port admin-port cluster(yes/no)
  cat <<TOML
[server]
listen = "127.0.0.1:$2"
max_connections = 19000
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[connection]
max_inbound_rate = 0
[origins]
allow = ["http://localhost:*"]
[admin]
listen = "127.0.0.1:$3"
[log]
level = "warn"
TOML
  if [ "$4" = yes ]; then
    printf '[cluster]\nnats_url = ["nats://127.0.0.1:14222"]\nnode_name = "%s"\n' "$1"
  fi
}
node_toml a 18443 19090 yes > a.toml
node_toml b 18444 19091 yes > b.toml
node_toml single 18445 19092 no > single.toml
nats-server -a 127.0.0.1 -p 14222 -m 18222 2>nats.log & NATS=$!; PIDS+=($NATS)
sleep 0.5
"$BIN" serve --config a.toml 2>a.log & A=$!; PIDS+=($A)
"$BIN" serve --config b.toml 2>b.log & B=$!; PIDS+=($B)
"$BIN" serve --config single.toml 2>single.log & S=$!; PIDS+=($S)
for port in 18443 18444 18445; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
sleep 1
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks
bench() { # label pids-to-time -- bench args
  local label=$1 pids=$2; shift 2
  local before=() after=() i=0 p r
  for p in $pids; do before+=("$(cpu "$p")"); done
  r=$("$BIN" bench --ca cert.pem --origin http://localhost:1 "$@" 2>/dev/null) || r='{}'
  for p in $pids; do after+=("$(cpu "$p")"); done
  local cpus=""
  for p in $pids; do
    cpus="$cpus\"$p\":$(( (${after[$i]} - ${before[$i]}) ))," ; i=$((i + 1))
  done
  echo "{\"run\":\"$label\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"cpu_ticks\":{${cpus%,}},\"report\":$r}"
}
echo "{\"pids\":{\"nats\":$NATS,\"a\":$A,\"b\":$B,\"single\":$S}}"
for run in $(seq "$RUNS"); do
  for rate in $RATES; do
    common=(--subscribers 1000 --rate "$rate" --payload 64 --duration 10s)
    bench "single/$rate/$run" "$S" --url wss://127.0.0.1:18445/ws "${common[@]}"
    bench "cluster/$rate/$run" "$A $B $NATS" --url wss://127.0.0.1:18443/ws \
        --url wss://127.0.0.1:18444/ws "${common[@]}"
  done
done
