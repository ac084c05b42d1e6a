import json,sys,glob,statistics
# usage: summary.py PATTERN LABEL [PATTERN LABEL...]: medians (ranges) per producers
args=sys.argv[1:]
for pat,label in zip(args[0::2],args[1::2]):
  rows={}
  for f in sorted(glob.glob(pat)):
    for l in open(f):
      r=json.loads(l)
      if r.get('kind')=='async':
        rows.setdefault(r['producers'],[]).append(r)
      if r.get('kind')=='async_sequential':
        rows.setdefault('seq',[]).append(r)
  for p in [1,4,16]:
    v=rows.get(p,[])
    if not v: continue
    c=[r['completed_per_s'] for r in v]; a=[r['accepted_per_s'] for r in v]
    print(f"{label} p={p} n={len(v)} completed {statistics.median(c):,.0f} ({min(c):,.0f}-{max(c):,.0f}) accepted {statistics.median(a):,.0f} 202p50 {statistics.median([r['accept_rtt_p50_ms'] for r in v]):.2f} to_succ_p50 {statistics.median([r['to_succeeded_p50_ms'] for r in v]):.0f} cpu {statistics.median([r['server_cpu_ms_per_inv'] for r in v]):.2f}")
  s=rows.get('seq',[])
  if s: print(f"{label} seq keys: ", {k: round(statistics.median([r[k] for r in s]),2) for k in s[0] if isinstance(s[0][k],float)})
