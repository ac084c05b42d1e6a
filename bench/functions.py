#!/usr/bin/env python3
"""Per-call CPU time and peak memory of pixflow's production functions (text, QR codes,
posters, frames, storyboards), with ffmpeg's CLI beside frame extraction.

usage (from the repository root, after `cargo build --release --features nasm,sse41`):
    python3 bench/functions.py ../shared/corpus [--runs 9] [--core 0]

Every call is a separate process pinned to one core (taskset); figures are the median of the
child's own user+sys CPU (os.wait4) and the largest peak RSS over the runs, so they include
process start-up, like the CLI peers in ../shared/bench. Prints a Markdown table.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PIXFLOW = os.path.abspath("target/release/pixflow")


def measure(cmd, cwd, runs, core):
    cpu, rss, wall = [], 0, []
    for i in range(runs + 1):
        t0 = time.monotonic()
        proc = subprocess.Popen(["taskset", "-c", core] + cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{err}")
        if i == 0:
            continue  # warm-up: page cache
        wall.append((time.monotonic() - t0) * 1000)
        cpu.append((usage.ru_utime + usage.ru_stime) * 1000)
        rss = max(rss, usage.ru_maxrss // 1024)
    return statistics.median(cpu), statistics.median(wall), rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--core", default="0")
    a = ap.parse_args()
    corpus = os.path.abspath(a.corpus)
    if not os.path.exists(PIXFLOW):
        sys.exit("build first: cargo build --release --features nasm,sse41")
    work = tempfile.mkdtemp(prefix="pixflow-fn-bench-")
    photo = f"{corpus}/jpeg/medium_fallenleaf_2560x1600.jpg"
    bbb = f"{corpus}/video/bigbuckbunny_h264_1280x720_5s.mp4"
    carphone = f"{corpus}/video/carphone_h264_176x144_4s.mp4"
    shutil.copy(f"{corpus}/jpeg/small_flower_480x360_exif.jpg", f"{work}/flower.jpg")
    shutil.copy(f"{corpus}/png/alpha_matplotlib_logo_542x130.png", f"{work}/logo.png")
    with open(f"{work}/poster.yaml", "w") as f:
        f.write(
            "width: 1080\nheight: 1620\n"
            "background: {gradient: {from: '#1a237e', to: '#880e4f', angle: 90}}\n"
            "layers:\n"
            "  - {type: image, input: flower.jpg, x: 60, y: 60, width: 960, height: 960, radius: 40}\n"
            "  - {type: rect, x: 60, y: 880, width: 960, height: 140, color: '#00000080'}\n"
            "  - {type: text, text: Spring Collection, x: 60, y: 900, width: 960, size: 80, color: white, align: center}\n"
            "  - {type: text, text: 'Fresh arrivals every week: scan for the catalogue and 20% off at checkout',"
            " x: 60, y: 1080, width: 600, size: 44, color: '#ffffffcc'}\n"
            "  - {type: qrcode, content: 'https://shop.example/spring', x: 720, y: 1080, size: 300, margin: 2}\n"
        )
    have_ffmpeg = shutil.which("ffmpeg") is not None
    if have_ffmpeg:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", bbb, "-an", "-c:v", "copy", "-bsf:v", "h264_mp4toannexb",
                        "-f", "mpegts", f"{work}/bbb.ts"], check=True)
    P = PIXFLOW
    cases = [
        ("text caption on 4 MP JPEG, stroke + shadow, q85",
         [P, "run", "text", "text=Autumn in the park", "size=96", "stroke=black", "stroke_width=3", "shadow=#00000099",
          "gravity=south", "y=60", "--input", photo, "--output", "t.jpg", "--quality", "85"]),
        ("text watermark tiled at -30°, 4 MP JPEG, q85",
         [P, "run", "text", "text=© pixflow", "size=48", "tile=true", "spacing=120", "angle=-30", "opacity=0.3",
          "--input", photo, "--output", "tw.jpg", "--quality", "85"]),
        ("qrcode 512 px PNG", [P, "run", "qrcode", "content=https://example.com/p/42", "size=512", "--output", "q.png"]),
        ("qrcode 512 px with centre logo", [P, "run", "qrcode", "content=https://example.com/p/42", "size=512",
                                            "logo=logo.png", "--output", "ql.png"]),
        ("compose 1080x1620 poster (photo, gradient, 2 text boxes, QR) → JPEG q85",
         [P, "run", "compose", "template=poster.yaml", "--output", "poster.jpg", "--quality", "85"]),
        ("frame at 2.5 s of 720p H.264 MP4 → PNG", [P, "run", "frames", "times=2.5", "--input", bbb, "--output", "f-{ms}.png"]),
        ("frame at 2.5 s of 720p H.264 MP4 → JPEG q80",
         [P, "run", "frames", "times=2.5", "--input", bbb, "--output", "f-{ms}.jpg", "--quality", "80"]),
        ("4 evenly spaced frames of 720p MP4 → JPEG q80",
         [P, "run", "frames", "count=4", "--input", bbb, "--output", "c-{n}.jpg", "--quality", "80"]),
        ("storyboard: 20 frames of QCIF MP4 (B-frames) → sprite + WebVTT",
         [P, "run", "frames", "count=20", "+", "sprite", "columns=5", "vtt=true", "--input", carphone, "--output", "board.jpg"]),
    ]
    if have_ffmpeg:
        cases += [
            ("frame at 2.5 s of the same clip as MPEG-TS → PNG",
             [P, "run", "frames", "times=2.5", "--input", "bbb.ts", "--output", "ts-{ms}.png"]),
            ("ffmpeg 5.1 CLI: frame at 2.5 s of the MP4 → PNG (peer)",
             ["ffmpeg", "-v", "error", "-y", "-threads", "1", "-ss", "2.5", "-i", bbb, "-frames:v", "1", "ff.png"]),
            ("ffmpeg 5.1 CLI: frame at 2.5 s of the MP4 → JPEG -q:v 4 (peer)",
             ["ffmpeg", "-v", "error", "-y", "-threads", "1", "-ss", "2.5", "-i", bbb, "-frames:v", "1", "-q:v", "4", "ff.jpg"]),
            ("ffmpeg 5.1 CLI: 4 frames by select → PNG (peer)",
             ["ffmpeg", "-v", "error", "-y", "-threads", "1", "-i", bbb, "-vf",
              "select='eq(n\\,16)+eq(n\\,49)+eq(n\\,82)+eq(n\\,115)'", "-fps_mode", "passthrough", "ffc-%d.png"]),
        ]
    print("| function | CPU ms (median) | wall ms | peak RSS MB |")
    print("|---|---|---|---|")
    for name, cmd in cases:
        cpu, wall, rss = measure(cmd, work, a.runs, a.core)
        print(f"| {name} | {cpu:.1f} | {wall:.1f} | {rss} |", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
