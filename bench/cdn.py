#!/usr/bin/env python3
"""CDN edge benchmark beside thumbor, in one run, with wrk.

usage (repository root, after `cargo build --release --features nasm,sse41`, thumbor's venv from
`../shared/bench/peers/setup_peers.sh` and `apt-get install wrk`):

    python3 bench/cdn.py ../shared/corpus OUT_DIR [SECONDS]

The operation is the peers' `thumbnail` (large_kleiber_6028x3391.jpg fit in 800x800, JPEG
quality 80). Each server is pinned to core 0 with one image worker (thumbor
ENGINE_THREADPOOL_SIZE=0, pixflow --cpus 1), wrk to core 1.

- hit: the same URL again and again, answered from the edge cache (pixflow: a preset URL, memory
  tier; thumbor: its file result storage with RESULT_STORAGE_STORES_UNSAFE). Throughput, p50 and
  p99 at 1, 4 and 16 connections, server CPU per request.
- miss: every request a new width (boxes 400-649 px wide at 1 connection, 650-899 at 2, so no
  run meets another's results), so every answer is a transformation (pixflow: unsigned ad-hoc
  URLs; thumbor: result storage off), at 1 and 2 connections.
- engine: the same thumbnail POSTed to the preset's function, sequentially; the median engine CPU
  it reports in Server-Timing is the "engine's own CPU time" the miss is compared with.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile

from load import PIXFLOW, STATUS_LUA, THUMBOR, proc_cpu, proc_hwm_mb, wait_http, wrk

SOURCE = "jpeg/large_kleiber_6028x3391.jpg"
ADMIN = "pfx_bench-cdn-admin-token"
VARY_LUA = STATUS_LUA + r"""
counter = 0
base = tonumber(os.getenv("WIDTH_BASE"))
function request()
  counter = counter + 1
  return wrk.format("GET", string.format(os.getenv("PATH_FMT"), base + (counter % 250)))
end
"""
PRESET = """name: thumb800
version: '1'
pipeline:
  - {op: resize, params: {width: 800, height: 800, fit: inside}}
  - {op: convert, params: {quality: 80}}
quota: {timeout: 30s, concurrency: 4, max_queue: 100}
scaling: {min: 1, max: 1}
auth: none
cdn: {}
"""


def load(name, url, pid, lua, env, seconds, conns):
    rows = []
    for i, c in enumerate(conns):
        cpu0 = proc_cpu(pid)
        r = wrk(url, c, seconds, lua, {**env, "WIDTH_BASE": str(400 + 250 * i)})
        ok = r["statuses"].get(200, 0)
        r["server_cpu_ms_per_req"] = (proc_cpu(pid) - cpu0) * 1000 / max(ok, 1)
        r["server"] = name
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")
    return r, data


def thumbor(corpus, work, seconds, stored):
    conf = os.path.join(work, f"thumbor-{'stored' if stored else 'plain'}.conf")
    results = os.path.join(work, "thumbor-results")
    with open(conf, "w") as f:
        f.write(
            f"LOADER = 'thumbor.loaders.file_loader'\nFILE_LOADER_ROOT_PATH = '{corpus}'\n"
            "STORAGE = 'thumbor.storages.no_storage'\nALLOW_UNSAFE_URL = True\nENGINE_THREADPOOL_SIZE = 0\n"
            "AUTO_WEBP = False\nRESPECT_ORIENTATION = False\nMAX_PIXELS = 100000000.0\n"
        )
        if stored:
            f.write(
                "RESULT_STORAGE = 'thumbor.result_storages.file_storage'\n"
                f"RESULT_STORAGE_FILE_STORAGE_ROOT_PATH = '{results}'\nRESULT_STORAGE_STORES_UNSAFE = True\n"
                "RESULT_STORAGE_EXPIRATION_SECONDS = 86400\n"
            )
        else:
            f.write("RESULT_STORAGE = None\n")
    th = subprocess.Popen(
        ["taskset", "-c", "0", f"{THUMBOR}/bin/thumbor", "-i", "127.0.0.1", "-p", "18888", "-c", conf, "-l", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_http(18888, "/healthcheck")
        base = "http://127.0.0.1:18888"
        lua = os.path.join(work, "status.lua")
        if stored:
            path = f"/unsafe/fit-in/800x800/filters:quality(80)/{SOURCE}"
            request(18888, "GET", path)  # warm: stored from now on
            rows = load("thumbor", base + path, th.pid, lua, {}, seconds, [1, 4, 16])
        else:
            vary = os.path.join(work, "vary.lua")
            env = {"PATH_FMT": f"/unsafe/fit-in/%dx800/filters:quality(80)/{SOURCE}"}
            rows = load("thumbor", base + "/", th.pid, vary, env, seconds, [1, 2])
        return rows, proc_hwm_mb(th.pid)
    finally:
        th.terminate()
        th.wait()


def pixflow(corpus, work, seconds):
    fdir = os.path.join(work, "functions")
    os.makedirs(fdir, exist_ok=True)
    with open(os.path.join(fdir, "thumb800.yaml"), "w") as f:
        f.write(PRESET)
    data = os.path.join(work, "pixflow-data")
    p = subprocess.Popen(
        ["taskset", "-c", "0", PIXFLOW, "serve", "--listen", "127.0.0.1:18890", "--data-dir", data,
         "--functions", fdir, "--cpus", "1", "--admin-token", ADMIN, "--cdn-allow-unsigned"],
        stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"},
    )
    try:
        wait_http(18890, "/readyz")
        auth = {"Authorization": f"Bearer {ADMIN}"}
        request(18890, "PUT", "/v1/buckets/public", b'{"public": true}', auth)
        with open(os.path.join(corpus, SOURCE), "rb") as f:
            img = f.read()
        request(18890, "PUT", f"/v1/buckets/public/objects/{SOURCE}", img, {**auth, "Content-Type": "image/jpeg"})
        # Engine CPU of the same operation, as the gateway reports it.
        cpus = []
        for _ in range(15):
            r, _ = request(18890, "POST", "/v1/functions/thumb800/invoke", img, {"Content-Type": "image/jpeg"})
            timing = dict(part.strip().split(";dur=") for part in r.getheader("Server-Timing").split(","))
            cpus.append(float(timing["cpu"]))
        engine = statistics.median(cpus[3:])
        print(json.dumps({"engine_cpu_ms": engine, "samples": cpus}), flush=True)
        base = "http://127.0.0.1:18890"
        lua = os.path.join(work, "status.lua")
        hit_path = f"/cdn/p/thumb800/public/{SOURCE}"
        r, _ = request(18890, "GET", hit_path)
        assert r.getheader("X-Cache") == "MISS"
        r, _ = request(18890, "GET", hit_path)
        assert r.getheader("X-Cache") == "HIT"
        hits = load("pixflow", base + hit_path, p.pid, lua, {}, seconds, [1, 4, 16])
        vary = os.path.join(work, "vary.lua")
        env = {"PATH_FMT": f"/cdn/t/_/resize,width=%d,height=800,fit=inside+convert,quality=80/public/{SOURCE}"}
        misses = load("pixflow", base + "/", p.pid, vary, env, seconds, [1, 2])
        return hits, misses, engine, proc_hwm_mb(p.pid)
    finally:
        p.terminate()
        p.wait()


def main():
    corpus, out = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pixflow-cdn-")
    with open(os.path.join(work, "status.lua"), "w") as f:
        f.write(STATUS_LUA)
    with open(os.path.join(work, "vary.lua"), "w") as f:
        f.write(VARY_LUA)
    th_hits, th_hit_rss = thumbor(corpus, work, seconds, stored=True)
    th_misses, th_miss_rss = thumbor(corpus, work, seconds, stored=False)
    px_hits, px_misses, engine, px_rss = pixflow(corpus, work, seconds)
    results = {
        "thumbor_hits": th_hits, "thumbor_misses": th_misses, "pixflow_hits": px_hits, "pixflow_misses": px_misses,
        "pixflow_engine_cpu_ms": engine, "peak_rss_mb": {"thumbor": max(th_hit_rss, th_miss_rss), "pixflow": px_rss},
    }
    with open(os.path.join(out, "cdn.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| server | kind | conns | req/s | p50 ms | p99 ms | server CPU ms/req | non-200 |", "|---|---|---|---|---|---|---|---|"]
    for kind, rows in [("hit", th_hits + px_hits), ("miss", th_misses + px_misses)]:
        for r in rows:
            bad = r["requests"] - r["statuses"].get(200, 0)
            lines.append(
                f"| {r['server']} | {kind} | {r['conns']} | {r['rps']:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
                f"| {r['server_cpu_ms_per_req']:.2f} | {bad} |"
            )
    miss1 = next(r for r in px_misses if r["conns"] == 1)
    lines.append("")
    lines.append(
        f"pixflow engine CPU (Server-Timing median): {engine:.1f} ms; miss server CPU per request at 1 connection: "
        f"{miss1['server_cpu_ms_per_req']:.1f} ms ({miss1['server_cpu_ms_per_req'] / engine:.2f}x)"
    )
    lines.append(f"peak RSS: thumbor {results['peak_rss_mb']['thumbor']:.0f} MB, pixflow {px_rss:.0f} MB")
    with open(os.path.join(out, "cdn.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
