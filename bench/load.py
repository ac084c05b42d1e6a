#!/usr/bin/env python3
"""Load benchmark of the function gateway beside thumbor, in one run, with wrk.

usage (repository root, after `cargo build --release --features nasm,sse41` and
`bash ../shared/bench/peers/setup_peers.sh` or at least thumbor's venv and `apt-get install wrk`):

    python3 bench/load.py ../shared/corpus OUT_DIR [SECONDS]

- thumbnail: fit in 800x800, JPEG quality 80, of large_kleiber_6028x3391.jpg (the peers'
  `thumbnail` op). thumbor GETs it from its file loader; pixflow gets it POSTed (the invoke
  API; object references arrive with object storage). Servers are pinned to core 0 with one
  worker each (thumbor ENGINE_THREADPOOL_SIZE=0, pixflow --cpus 1), wrk to core 1.
  Throughput and p50/p99 at several connection counts; server CPU per request and peak RSS from
  /proc.
- gateway overhead: a 64x64 PNG through `flip`, sequential on one keep-alive connection: client
  wall time minus the engine time the server reports in Server-Timing (an upper bound: it
  includes this Python client and the loopback round trip).
- overload: 64 connections against a function with 1 slot and a queue of 4 (expect 429s), and
  against a node admitting 8 requests (expect 503s); peak RSS before and after.
"""
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PIXFLOW = os.path.join(ROOT, "target/release/pixflow")
THUMBOR = os.environ.get("THUMBOR_VENV", "/tmp/peers/thumbor")
CONNS = [1, 2, 4, 8, 16]

STATUS_LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  statuses = {}
  local path = os.getenv("BODY")
  if path then
    local f = assert(io.open(path, "rb")); wrk.body = f:read("*a"); f:close()
    wrk.method = "POST"
    wrk.headers["Content-Type"] = os.getenv("CTYPE") or "application/octet-stream"
  end
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do all[k] = (all[k] or 0) + v end
  end
  for k, v in pairs(all) do io.write(string.format("status %d %d\n", k, v)) end
end
"""


def proc_cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:13]) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(port, path):
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on {port} did not come up")


def unit_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url, conns, seconds, lua, env):
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "30s", "-s", lua, url],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    ).stdout
    r = {"conns": conns}
    r["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", out)
        r[f"p{pct}_ms"] = unit_ms(m.group(1), m.group(2))
    r["statuses"] = {int(a): int(b) for a, b in re.findall(r"status (\d+) (\d+)", out)}
    r["requests"] = sum(r["statuses"].values())
    return r


def run_load(name, url, pid, lua, env, seconds):
    rows = []
    for c in CONNS:
        cpu0 = proc_cpu(pid)
        r = wrk(url, c, seconds, lua, env)
        ok = r["statuses"].get(200, 0)
        r["server_cpu_ms_per_req"] = (proc_cpu(pid) - cpu0) * 1000 / max(ok, 1)
        r["server"] = name
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows, proc_hwm_mb(pid)


def overload(url, pid, lua, env, seconds):
    """64 connections for `seconds`, with the server's peak RSS before and after."""
    before = proc_hwm_mb(pid)
    r = wrk(url, 64, seconds, lua, env)
    r["rss_before_mb"], r["rss_after_mb"] = before, proc_hwm_mb(pid)
    print(json.dumps(r), flush=True)
    return r


def start_pixflow(fdir, data, port, extra=()):
    p = subprocess.Popen(
        ["taskset", "-c", "0", PIXFLOW, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--functions", fdir, "--cpus", "1", "--admin-token", "pfx_bench-load-admin-token", *extra],
        stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"},
    )
    wait_http(port, "/readyz")
    return p


def main():
    corpus, out = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pixflow-load-")
    lua = os.path.join(work, "status.lua")
    open(lua, "w").write(STATUS_LUA)
    image = os.path.join(corpus, "jpeg/large_kleiber_6028x3391.jpg")
    results = {"seconds": seconds, "image": os.path.relpath(image, corpus), "load": []}

    # thumbor
    conf = os.path.join(work, "thumbor.conf")
    open(conf, "w").write(
        f"LOADER = 'thumbor.loaders.file_loader'\nFILE_LOADER_ROOT_PATH = '{corpus}'\n"
        "STORAGE = 'thumbor.storages.no_storage'\nRESULT_STORAGE = None\nALLOW_UNSAFE_URL = True\n"
        "ENGINE_THREADPOOL_SIZE = 0\nAUTO_WEBP = False\nPRESERVE_EXIF_INFO = False\nRESPECT_ORIENTATION = False\n"
        "MAX_WIDTH = 0\nMAX_HEIGHT = 0\nMAX_PIXELS = 100000000.0\n"
    )
    th = subprocess.Popen(
        ["taskset", "-c", "0", f"{THUMBOR}/bin/thumbor", "-i", "127.0.0.1", "-p", "18888", "-c", conf, "-l", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_http(18888, "/healthcheck")
        url = "http://127.0.0.1:18888/unsafe/fit-in/800x800/filters:quality(80)/jpeg/large_kleiber_6028x3391.jpg"
        rows, hwm = run_load("thumbor", url, th.pid, lua, {}, seconds)
        results["load"] += rows
        results["thumbor_peak_rss_mb"] = hwm
    finally:
        th.terminate()
        th.wait()

    # pixflow
    fdir = os.path.join(work, "functions")
    os.makedirs(fdir)
    open(os.path.join(fdir, "thumbnail.yaml"), "w").write(
        "name: thumbnail\nversion: '1'\nbuiltin: resize\nparams: {width: 800, height: 800, fit: inside}\n"
        "auth: none\nquota: {concurrency: 16, max_queue: 64}\nscaling: {min: 1, max: 1}\n"
    )
    open(os.path.join(fdir, "flip.yaml"), "w").write(
        "name: flip\nversion: '1'\nbuiltin: flip\nauth: none\nscaling: {min: 1, max: 1}\nquota: {concurrency: 4}\n"
    )
    open(os.path.join(fdir, "tight.yaml"), "w").write(
        "name: tight\nversion: '1'\nbuiltin: resize\nparams: {width: 800, height: 800, fit: inside}\n"
        "auth: none\nquota: {concurrency: 1, max_queue: 4}\nscaling: {min: 1, max: 1}\n"
    )
    px = start_pixflow(fdir, os.path.join(work, "data"), 18080)
    try:
        base = "http://127.0.0.1:18080/v1/functions"
        env = {"BODY": image, "CTYPE": "image/jpeg"}
        rows, hwm = run_load("pixflow", f"{base}/thumbnail/invoke", px.pid, lua, env, seconds)
        results["load"] += rows
        results["pixflow_peak_rss_mb"] = hwm

        # Gateway overhead, sequential on one connection.
        tiny = os.path.join(work, "tiny.png")
        subprocess.run([PIXFLOW, "run", "qrcode", "content=x", "size=64", "--output", tiny], check=True, capture_output=True)
        body = open(tiny, "rb").read()
        conn = http.client.HTTPConnection("127.0.0.1", 18080)
        wall, engine = [], []
        for i in range(2200):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/functions/flip/invoke", body=body)
            r = conn.getresponse()
            r.read()
            t1 = time.perf_counter()
            assert r.status == 200, r.status
            if i >= 200:
                wall.append((t1 - t0) * 1000)
                engine.append(float(re.search(r"cpu;dur=([\d.]+)", r.getheader("server-timing")).group(1)))
        results["gateway"] = {
            "requests": len(wall),
            "wall_p50_ms": statistics.median(wall),
            "engine_p50_ms": statistics.median(engine),
            "overhead_p50_ms": statistics.median([w - e for w, e in zip(wall, engine)]),
        }
        print(json.dumps(results["gateway"]), flush=True)
        results["gateway_wrk"] = wrk(f"{base}/flip/invoke", 1, seconds, lua, {"BODY": tiny, "CTYPE": "image/png"})
        print(json.dumps(results["gateway_wrk"]), flush=True)

        # Overload: the function's queue.
        results["overload_queue"] = overload(f"{base}/tight/invoke", px.pid, lua, env, seconds)
    finally:
        px.terminate()
        px.wait()

    # Overload: the node (8 admitted requests), function queue large.
    px = start_pixflow(fdir, os.path.join(work, "data2"), 18081, ["--max-requests", "8"])
    try:
        results["overload_node"] = overload("http://127.0.0.1:18081/v1/functions/thumbnail/invoke", px.pid, lua, env, seconds)
    finally:
        px.terminate()
        px.wait()

    json.dump(results, open(os.path.join(out, "load.json"), "w"), indent=1)
    lines = ["| server | conns | req/s | p50 ms | p99 ms | server CPU ms/req | non-200 |", "|---|---|---|---|---|---|---|"]
    for r in results["load"]:
        bad = r["requests"] - r["statuses"].get(200, 0)
        lines.append(f"| {r['server']} | {r['conns']} | {r['rps']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_cpu_ms_per_req']:.1f} | {bad} |")
    g = results["gateway"]
    lines += [
        "",
        f"peak RSS: thumbor {results['thumbor_peak_rss_mb']:.0f} MB, pixflow {results['pixflow_peak_rss_mb']:.0f} MB",
        f"gateway (64x64 PNG flip, {g['requests']} sequential requests): wall p50 {g['wall_p50_ms']:.3f} ms, "
        f"engine p50 {g['engine_p50_ms']:.3f} ms, overhead p50 {g['overhead_p50_ms']:.3f} ms; "
        f"wrk c=1: p50 {results['gateway_wrk']['p50_ms']:.3f} ms, {results['gateway_wrk']['rps']:.0f} req/s",
    ]
    for key in ("overload_queue", "overload_node"):
        r = results[key]
        lines.append(
            f"{key}: 64 conns, {r['requests']} answers {r['statuses']}, p99 {r['p99_ms']:.1f} ms, "
            f"peak RSS {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB"
        )
    open(os.path.join(out, "load.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
