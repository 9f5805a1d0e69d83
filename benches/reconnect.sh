#!/usr/bin/env bash
# Reconnect storm with and without TLS resumption, idle memory with tickets
# on and off, and the 10,000-client burst (docs/benchmarks.md, "Reconnect
# storm and TLS resumption"); every run against a freshly started broker,
# interleaved. Prints one line per run.
#   cargo build --release && benches/reconnect.sh [RUNS]
# Everything talks to 127.0.0.1 only; every broker is stopped by pid.
set -u
RUNS=${1:-3}
N=${N:-10000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/wsbroker
WORK=$(mktemp -d)
PID=
trap 'kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK"
start() { # session_tickets
    printf '[server]\nmax_connections = 19000\n[tls]\nsession_tickets = %s\n[log]\nlevel = "warn"\n' "$1" >cfg.toml
    "$BIN" serve --dev --config cfg.toml 2>/dev/null &
    PID=$!
    for _ in $(seq 100); do [ -s wsbroker-dev-cert.pem ] && curl -sf http://127.0.0.1:9090/readyz >/dev/null && return; sleep 0.1; done
    echo "broker did not start" >&2; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null; rm -f wsbroker-dev-cert.pem; }
bench() {
    "$BIN" bench --url wss://127.0.0.1:8443/ws --ca wsbroker-dev-cert.pem \
        --origin http://localhost:1 --server-pid "$PID" --connections-only "$N" "$@" 2>/dev/null
}
for run in $(seq "$RUNS"); do
    for c in 64 10000; do
        start true
        bench --reconnect --connect-concurrency "$c" | python3 -c "
import json, sys
d = json.load(sys.stdin)['reconnect']
for k in ('full', 'resumed'):
    r = d[k]
    print('run $run storm c=$c', k, 'per_s=%.0f' % r['per_s'], 'server_us=%.0f' % r['server_cpu_us_per_connection'],
          'client_us=%.0f' % (1e6 * r['client_cpu_seconds'] / r['connections']), 'resumed=%d' % r['resumed'], 'errors=%d' % r['errors'])"
        stop
    done
    for t in true false; do
        start "$t"
        bench --hold 2s | python3 -c "
import json, sys
d = json.load(sys.stdin)
print('run $run idle tickets=$t', 'rss_per_conn=%s' % d['server_rss_per_connection_bytes'], 'errors=%d' % d['connect_errors'])"
        stop
    done
    start true
    bench --connect-concurrency 10000 | python3 -c "
import json, sys
d = json.load(sys.stdin)
print('run $run burst', 'per_s=%.0f' % d['connect_per_s'], 'errors=%d' % d['connect_errors'], 'rss_per_conn=%s' % d['server_rss_per_connection_bytes'])"
    stop
done
