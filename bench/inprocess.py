#!/usr/bin/env python3
"""In-process figures for crop + rotate and watermark, the way the peers' libraries are timed:
Pillow's loop (../shared/bench/peers/peer_pillow.py) beside `pixflow batch` over 40 copies
of the same photo with one worker, alternating, pinned to one core, in one run.

usage (repository root, release build present, peers installed):
    python3 bench/inprocess.py ../shared/corpus [--rounds 3]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "..", "..", "shared", "bench", "peers")
PY = "/tmp/peers/py/bin/python"


def pillow(op, corpus, out):
    res = subprocess.run(["taskset", "-c", "0", PY, os.path.join(PEERS, "peer_pillow.py"), op, corpus, out, "40", "60"],
                         capture_output=True, text=True, check=True)
    line = json.loads(res.stdout.strip().splitlines()[-1])
    return statistics.median(line["cpu_s"]) * 1000


def ours(steps, src, out):
    cmd = ["taskset", "-c", "0", "target/release/pixflow", "batch", *steps, "--input", src, "--output", out,
           "--quality", "85", "--jobs", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("pixflow batch failed")
    return (usage.ru_utime + usage.ru_stime) * 1000 / 40


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    corpus = os.path.abspath(a.corpus)
    work = tempfile.mkdtemp(prefix="pixflow-inproc-")
    src = os.path.join(work, "in")
    os.makedirs(src)
    for i in range(40):
        shutil.copy(f"{corpus}/jpeg/medium_fallenleaf_2560x1600.jpg", f"{src}/m{i:02}.jpg")
    logo = f"{corpus}/png/alpha_matplotlib_logo_542x130.png"
    ops = {
        "crop_rotate": ["crop", "x=780", "y=300", "width=1000", "height=1000", "+", "rotate", "angle=90"],
        "watermark": ["watermark", f"image={logo}", "gravity=southeast", "opacity=0.5"],
    }
    print("| op | round | Pillow in-process CPU ms/img | pixflow batch CPU ms/img | ratio |")
    print("|---|---|---|---|---|")
    for op, steps in ops.items():
        for r in range(a.rounds):
            p = pillow(op, corpus, os.path.join(work, "pil"))
            o = ours(steps, src, os.path.join(work, "out"))
            print(f"| {op} | {r + 1} | {p:.2f} | {o:.2f} | {o / p:.2f}x |", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
