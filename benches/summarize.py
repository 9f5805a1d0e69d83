"""Medians per scenario of `wsbroker bench` reports (one JSON line each)."""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    row = json.loads(line)
    runs[row["scenario"]].append(row["report"])

def med(reports, key, sub=None):
    vals = [(r[key][sub] if sub else r[key]) for r in reports]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else float("nan")

for name, rs in runs.items():
    print(
        f"{name:22s} runs={len(rs)} deliveries/s={med(rs, 'deliveries_per_s'):,.0f} "
        f"lost={med(rs, 'lost'):,.0f} p50={med(rs, 'latency_ms', 'p50'):.1f}ms "
        f"p99={med(rs, 'latency_ms', 'p99'):.1f}ms p999={med(rs, 'latency_ms', 'p999'):.1f}ms "
        f"server_cpu={med(rs, 'server_cpu_seconds'):.2f}s client_cpu={med(rs, 'client_cpu_seconds'):.2f}s "
        f"rss={med(rs, 'server_rss_bytes') / 2**20:.0f}MiB conn/s={med(rs, 'connect_per_s'):,.0f} "
        f"rss/conn={med(rs, 'server_rss_per_connection_bytes'):,.0f}B "
        f"connect_errors={med(rs, 'connect_errors'):.0f}"
    )
