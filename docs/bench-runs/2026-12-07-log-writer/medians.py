"""Medians and ranges over rounds of before.jsonl and after.jsonl (run from this folder)."""
import json,statistics,glob
def rows(which):
    out=[]
    for f in sorted(glob.glob(f"{which}.jsonl") + glob.glob(f"{which}-*.jsonl")):
        out+= [json.loads(l) for l in open(f)]
    return out
def med(v): return statistics.median(v)
R={w:rows(w) for w in ("before","after")}
print("machine loads:", {w:[r["load"] for r in R[w] if r.get("kind")=="machine"] for w in R})
print("\nthroughput: c p | before msgs/s med (range) cpu | after msgs/s med (range) cpu")
for c in (2,4):
  for p in (1,4,16):
    cells=[]
    for w in ("before","after"):
      xs=[r for r in R[w] if r.get("kind")=="throughput" and r["consumers"]==c and r["producers"]==p]
      m=[x["msgs_per_s"] for x in xs]; cpu=[x["cpu_ms_per_msg"] for x in xs]
      cells.append(f"{med(m):.0f} ({min(m):.0f}-{max(m):.0f}) {med(cpu):.2f}")
    print(c,p,"|"," | ".join(cells))
print("\nasync: p | field: before med (range) -> after med (range)")
F=["accepted_per_s","completed_per_s","accept_rtt_p50_ms","accept_rtt_p99_ms","to_succeeded_p50_ms","to_succeeded_p99_ms","server_cpu_ms_per_inv","client_cpu_ms_per_inv"]
for p in (1,4,16):
  for f in F:
    cells=[]
    for w in ("before","after"):
      v=[r[f] for r in R[w] if r.get("kind")=="async" and r["producers"]==p]
      cells.append(f"{med(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    print(p,f,": "," -> ".join(cells))
print("\nsequential")
F=["accept_rtt_p50_ms","accept_rtt_p99_ms","to_succeeded_p50_ms","to_succeeded_p99_ms","callback_p50_ms","callback_p99_ms","server_cpu_ms_per_inv"]
for f in F:
    cells=[]
    for w in ("before","after"):
      v=[r[f] for r in R[w] if r.get("kind")=="async_sequential"]
      cells.append(f"{med(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    print(f,": "," -> ".join(cells))
print("\nlatency (enqueue -> start of work)")
F=["p50_ms","p90_ms","p99_ms","enqueue_p50_ms","wake_claim_p50_ms","cpu_ms_per_msg"]
for f in F:
    cells=[]
    for w in ("before","after"):
      v=[r[f] for r in R[w] if r.get("kind")=="latency"]
      if v: cells.append(f"{med(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    print(f,": "," -> ".join(cells))
