import json, sys, statistics as st
def load(p):
    return [json.loads(l) for l in open(p) if l.strip()]
def med(xs): return st.median(xs)
for p in sys.argv[1:]:
    rows = load(p)
    lat = [r for r in rows if r.get("kind") == "latency"]
    tp = [r for r in rows if r.get("kind") == "throughput"]
    print(f"== {p}: {len(lat)} latency rounds")
    if lat:
        for k in ["p50_ms","p90_ms","p99_ms","enqueue_p50_ms","wake_claim_p50_ms","cpu_ms_per_msg"]:
            v=[r[k] for r in lat]; print(f"  {k}: {med(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    keys = sorted({(r["consumers"], r["producers"]) for r in tp})
    for c,pr in keys:
        rs=[r for r in tp if r["consumers"]==c and r["producers"]==pr]
        v=[r["msgs_per_s"] for r in rs]; e=[r["enqueued_per_s"] for r in rs]; cpu=[r["cpu_ms_per_msg"] for r in rs]
        print(f"  C={c} P={pr}: {med(v):.0f} ({min(v):.0f}-{max(v):.0f}) enq {med(e):.0f} cpu {med(cpu):.2f}")
