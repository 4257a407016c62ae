"""Must-show 1: ``edgecl run`` on a video of val images gives ``edgecl eval``'s accuracy.

    python -m benchmarks device_video_parity --engine /tmp/exp/ranpac-fp32 --data ../shared/data/tiny-imagenet-100

The frames are the exact pixels ``edgecl eval ENGINE_DIR`` classifies (edgecl.data's decode:
shorter side to the input size, bicubic, centre crop), in BGR, written at the model's input
size to an FFV1 (lossless) .avi, so the loop's resize is a no-op and the video adds no loss
(checked: the decoded frames are compared with the source pixels). The loop runs as the CLI
does (``edgecl run ... --headless --jsonl``) and its top-1 labels are scored against the val
labels; ``edgecl eval ENGINE_DIR --json`` runs on the same folder. Prints the two accuracies as
a Markdown table (OUT/table.md) and writes the figures to OUT/results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, read_manifest, write_results

PROG = "python -m benchmarks device_video_parity"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--work", help="Folder for the video and the JSON lines (default: a temporary one).")
    ap.add_argument("--out", default="runs/device-video-parity", help="Folder for table.md and results.json.")
    args = ap.parse_args(argv)

    import cv2

    from edgecl.data import load_imagefolder

    manifest = read_manifest(args.engine)
    size = int(manifest["input"]["size"])
    classes = json.loads((Path(args.engine) / manifest["classes"].get("file", "classes.json")).read_text())
    known = {c: i for i, c in enumerate(classes)}
    folder = Path(args.data) / args.split
    images = load_imagefolder(folder, size=size, progress=False)
    rows, y = images.relabel(classes)
    frames = np.ascontiguousarray(np.asarray(images.images)[rows][..., ::-1])  # RGB -> BGR, as eval feeds the graph

    work = Path(args.work or tempfile.mkdtemp(prefix="edgecl-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    video = work / "val.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 30, (size, size))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write FFV1 here; use an image folder as the source instead")
    for f in frames:
        writer.write(f)
    writer.release()
    cap = cv2.VideoCapture(str(video))
    same = 0
    for f in frames:
        ok, g = cap.read()
        same += bool(ok and np.array_equal(f, g))
    cap.release()
    print(f"video {video}: {len(frames)} frames {size}x{size} FFV1, {same} decode bit-exact")

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    jsonl = work / "frames.jsonl"
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "edgecl.cli", "run", args.engine, "--source", str(video), "--headless",
                          "--jsonl", str(jsonl), "--backend", "ort-cpu"],
                         capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise SystemExit(run.stderr or run.stdout)
    run_s = time.perf_counter() - t
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    pred = np.array([known.get(r["top"][0][0], -1) for r in lines])
    run_acc = 100.0 * float((pred == y[:len(pred)]).mean())
    ev = subprocess.run([sys.executable, "-m", "edgecl.cli", "eval", args.engine, "--data", args.data, "--split",
                         args.split, "--json"], capture_output=True, text=True, env=env, check=False)
    if ev.returncode != 0:
        raise SystemExit(ev.stderr or ev.stdout)
    eval_res = json.loads(ev.stdout.strip().splitlines()[-1])
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    result = {"frames": len(lines), "video_frames": len(frames), "bit_exact_frames": same,
              "run_accuracy": round(run_acc, 2), "eval_accuracy": eval_res["accuracy"], "eval_n": eval_res["n"],
              "difference": round(run_acc - eval_res["accuracy"], 4), "run_summary": summary,
              "run_wall_s": round(run_s, 1)}
    print(json.dumps(result))
    rows = [["`edgecl run` (top-1 of the JSON lines)", f"**{result['run_accuracy']:.2f}**", result["frames"]],
            [f"`edgecl eval {args.engine}`", f"**{result['eval_accuracy']:.2f}**", result["eval_n"]]]
    table = "\n".join(markdown_table(["", "accuracy", "n"], rows))
    write_results(args.out, table, result, PROG, argv)
    return 0
