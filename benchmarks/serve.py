"""`edgecl serve`: host time per frame with 0, 1 and 3 stream clients watching, and stream latency.

    OMP_NUM_THREADS=1 python -m benchmarks serve --engine edgecl-demo/engine-ranpac --out runs/serve

Runs the real command (``edgecl serve ENGINE --source VIDEO --backend ort-cpu``, a fresh store
under --out) on a generated camera-like video (``--frame-size``, default 640x480, a moving
pattern, Motion JPEG) played at ``--fps``, and for 0, 1 and 3 HTTP clients reading the MJPEG
stream (/api/stream.mjpg) measures over ``--seconds``, after a warm-up:

* host ms per frame in the camera loop (everything of a frame but the engine: fit, heads,
  top-k, and when someone watches the overlay and the JPEG), median and mean;
* the server process's CPU time per frame (all its threads: the loop, the engine, the web
  server sending to the clients), and what it adds over 0 clients;
* stream latency, frame captured (read from the source) to frame received whole by a client,
  median and p90 over every frame every client received (one clock: the same machine);
* frames per second processed, and received per client.

The settings are measured ``--repeat`` times, interleaved (0, 1, 3, 0, 1, 3, ...), and the table
gives the median of each figure over the rounds: on a shared machine the load drifts.

The server sends each client the newest frame when it is ready for one (nothing queues), so a
slow client skips frames rather than falling behind. Prints the Markdown table (OUT/table.md)
and writes OUT/results.json.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results

PROG = "python -m benchmarks serve"


def make_video(path: Path, frames: int, size: tuple, fps: float) -> Path:
    """A camera-like clip: a textured scene panning slowly, with sensor noise; Motion JPEG, as USB
    cameras deliver it (decoding a lossless codec would cost more than everything measured here)."""
    import cv2

    w, h = size
    rng = np.random.RandomState(0)
    scene = cv2.resize(rng.randint(0, 256, (h // 8, w // 4, 3)).astype(np.uint8), (2 * w, h),
                       interpolation=cv2.INTER_CUBIC)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for i in range(frames):
        x = int(i * w / frames)
        f = scene[:, x:x + w].astype(np.int16) + rng.randint(-6, 7, (h, w, 3))
        writer.write(np.clip(f, 0, 255).astype(np.uint8))
    writer.release()
    return path


def start_server(engine: str, video: Path, store: Path, fps: float) -> tuple:
    code = ("from edgecl.cli import main; "
            f"main(['serve', {engine!r}, '--source', {str(video)!r}, '--port', '0', '--backend', 'ort-cpu', "
            f"'--store', {str(store)!r}, '--fps', {str(fps)!r}])")
    p = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    lines = []
    while True:
        line = p.stdout.readline()
        if not line:
            raise SystemExit("edgecl serve exited before listening:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("edgecl serve: http://"):
            host, port = line.split()[2].split("//")[1].rstrip("/").rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # keep the pipe drained
            return p, host, int(port)


def status(host: str, port: int) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/api/status")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


class StreamClient(threading.Thread):
    """Reads /api/stream.mjpg, recording per frame (time received - time captured)."""

    def __init__(self, host: str, port: int):
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.latencies, self.stop, self.counting = [], threading.Event(), threading.Event()
        self.error = None

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            conn.request("GET", "/api/stream.mjpg")
            res = conn.getresponse()
            while not self.stop.is_set():
                line = res.readline()
                if not line:
                    return
                if not line.startswith(b"--"):
                    continue
                head = {}
                while (line := res.readline().strip()):
                    k, _, v = line.decode().partition(":")
                    head[k.lower()] = v.strip()
                res.read(int(head["content-length"]))
                now = time.time()
                if self.counting.is_set():
                    self.latencies.append(1000 * (now - float(head["x-captured-at"])))
            conn.close()
        except Exception as exc:  # noqa: BLE001 - reported in the results
            self.error = repr(exc)


def measure(host: str, port: int, clients: int, warmup: float, seconds: float) -> dict:
    streams = [StreamClient(host, port) for _ in range(clients)]
    for s in streams:
        s.start()
    time.sleep(warmup)
    a = status(host, port)
    for s in streams:
        s.counting.set()
    time.sleep(seconds)
    b = status(host, port)
    for s in streams:
        s.counting.clear()
        s.stop.set()
    ca, cb = a["camera"], b["camera"]
    frames = cb["frames"] - ca["frames"]
    lat = np.concatenate([s.latencies for s in streams]) if clients else np.zeros(0)
    wall = b["process"]["time"] - a["process"]["time"]
    return {
        "clients": clients, "frames": frames, "fps": round(frames / wall, 2),
        "host_ms_median": cb["latency"]["host_ms_median"],
        "host_ms_mean": round((cb["latency"]["host_ms_total"] - ca["latency"]["host_ms_total"]) / frames, 3),
        "engine_ms_mean": round((cb["latency"]["engine_ms_total"] - ca["latency"]["engine_ms_total"]) / frames, 3),
        "cpu_ms_per_frame": round(1000 * (b["process"]["cpu_s"] - a["process"]["cpu_s"]) / frames, 3),
        "latency_ms_median": round(float(np.median(lat)), 2) if len(lat) else None,
        "latency_ms_p90": round(float(np.percentile(lat, 90)), 2) if len(lat) else None,
        "received_fps_per_client": round(len(lat) / clients / seconds, 2) if clients else None,
        "client_errors": [s.error for s in streams if s.error],
    }


def median_of(runs: list) -> dict:
    """One setting's figures: the median over its rounds of each number."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("clients", "round"):
            vals = [r[key] for r in runs if r[key] is not None]
            out[key] = round(float(np.median(vals)), 3) if vals else None
    out.pop("round", None)
    out["client_errors"] = [e for r in runs for e in r["client_errors"]]
    out["rounds"] = len(runs)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--engine", required=True, help="An engine directory (e.g. the demo's edgecl-demo/engine-ranpac).")
    ap.add_argument("--out", required=True, help="Folder for the video, the store, table.md and results.json.")
    ap.add_argument("--fps", type=float, default=30.0, help="Rate the video is played at (default 30).")
    ap.add_argument("--frame-size", default="640x480", help="WxH of the generated video (default 640x480).")
    ap.add_argument("--seconds", type=float, default=15.0, help="Measured seconds per setting (default 15).")
    ap.add_argument("--warmup", type=float, default=4.0, help="Seconds before each measurement (default 4).")
    ap.add_argument("--clients", type=int, nargs="+", default=[0, 1, 3], help="Stream clients (default 0 1 3).")
    ap.add_argument("--repeat", type=int, default=3,
                    help="Rounds over the settings, interleaved; the table gives each setting's median (default 3).")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.frame_size.lower().split("x"))
    video = make_video(out / "source.avi", int(args.fps * 10), (w, h), args.fps)
    store = out / f"store-{os.getpid()}"
    p, host, port = start_server(args.engine, video, store, args.fps)
    rows, runs = [], []
    try:
        for rnd in range(args.repeat):
            for k in args.clients:
                r = measure(host, port, k, args.warmup, args.seconds)
                runs.append({"round": rnd, **r})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        p.terminate()
        p.wait(15)
    results = [median_of([r for r in runs if r["clients"] == k]) for k in dict.fromkeys(args.clients)]
    base = next((r for r in results if r["clients"] == 0), None)
    for r in results:
        added = "-"
        if base is not None and r is not base:
            added = (f"{r['host_ms_mean'] - base['host_ms_mean']:+.2f} / "
                     f"{r['cpu_ms_per_frame'] - base['cpu_ms_per_frame']:+.2f}")
        latency = "-" if r["latency_ms_median"] is None else \
            f"{r['latency_ms_median']:.1f} / {r['latency_ms_p90']:.1f}"
        rows.append([r["clients"], r["fps"], f"{r['host_ms_median']:.2f} / {r['host_ms_mean']:.2f}",
                     f"{r['cpu_ms_per_frame']:.2f}", added, f"{r['engine_ms_mean']:.2f}", latency,
                     "-" if r["received_fps_per_client"] is None else f"{r['received_fps_per_client']:.1f}"])
    table = "\n".join(markdown_table(
        ["stream clients", "frames/s", "loop host ms/frame (median / mean)", "process CPU ms/frame",
         "added vs 0 clients (loop host / CPU ms)", "engine ms", "latency captured -> received ms (median / p90)",
         "frames/s received per client"], rows))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_results(out, table, {"settings": vars(args), "load_average_after": load, "rows": results, "runs": runs},
                  PROG, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
