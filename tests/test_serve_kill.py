"""`edgecl serve` killed at any moment loses nothing it reported: the real command serves a
video while a client enrolls (from the camera and from uploaded images) and rolls back through
the API, and the server is SIGKILLed at random moments until at least 20 changes were reported
and 8 kills done; after each kill the store loads, every reported generation is in its history
with the content the API reported, and the server starts again on it."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import pytest
from helpers import class_frames, fresh_copy, http, multipart, png_bytes, runtime, serve_process, write_video

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def client(url: str, token: str, stop: threading.Event, rnd: random.Random, reported: list, run: int) -> None:
    """Changes back to back until the server dies: enroll from the camera or from images, or roll
    back to a generation the history offers; each 200 is appended to ``reported``."""
    i = 0
    while not stop.is_set():
        i += 1
        kind = rnd.choice(["live", "images", "rollback"])
        try:
            if kind == "live":
                name = f"live-{run}-{i}"
                status, _, body = http("POST", f"{url}/api/enroll", {"name": name, "frames": 3}, token=token,
                                       timeout=30)
                what = ("enroll", name)
            elif kind == "images":
                name = f"img-{run}-{i}"
                files = [("images", f"{j}.png", png_bytes(f)) for j, f in enumerate(class_frames(8 + i % 5, 3))]
                body, ctype = multipart({"name": name}, files)
                status, _, body = http("POST", f"{url}/api/enroll/images", body, token=token,
                                       headers={"Content-Type": ctype}, timeout=30)
                what = ("enroll", name)
            else:
                status, _, body = http("GET", f"{url}/api/history", timeout=30)
                hist = json.loads(body)
                choices = [g["generation"] for g in hist["generations"] if g["available"] and not g["current"]]
                if not choices:
                    continue
                to = rnd.choice(choices)
                status, _, body = http("POST", f"{url}/api/rollback", {"to": to}, token=token, timeout=30)
                what = ("rollback", to)
        except OSError:  # the server is gone (connection refused or reset): killed while this change was asked
            reported.append((None, "interrupted", kind))
            return
        if status == 200:
            reported.append((json.loads(body)["generation"], *what))


def test_serve_killed_at_random_moments_loses_no_reported_commit(engines, tmp_path):
    from edgecl.device.store import ClassStore

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    video = write_video(tmp_path / "seven.avi", class_frames(7, 30, seed=4, size=32))
    rnd = random.Random(1993)
    reported: list = []
    kills, start = 0, time.time()
    while sum(g is not None for g, *_ in reported) < 20 or kills < 8:
        assert kills < 40, f"only {len(reported)} changes reported in {kills} runs"
        p, url, token = serve_process(eng, video, "--token", "kill-test-token", "--fps", "30")
        stop = threading.Event()
        t = threading.Thread(target=client, args=(url, token, stop, rnd, reported, kills), daemon=True)
        t.start()
        time.sleep(rnd.uniform(0.3, 2.5))
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        stop.set()
        t.join(60)
        kills += 1
        # the store loads, and every generation the API reported is there with what it reported
        rt = runtime(eng)
        store: ClassStore = rt.heads.store
        listed = {h["generation"]: h for h in rt.heads.history()}
        for gen, op, arg in reported:
            if op == "interrupted":
                continue
            assert gen in listed and listed[gen]["available"], (gen, op, arg, sorted(listed))
            names = store.state_at(gen).names
            if op == "enroll":
                assert arg in names, (gen, arg, names)
            else:
                before = store.state_at(arg)
                assert names == (before.names if before is not None else rt.heads.initial_state().names), (gen, arg)
        assert rt.heads.state.generation >= max((g for g, *_ in reported if g is not None), default=0)
    ops = [op for _, op, _ in reported]
    print(f"{len(ops) - ops.count('interrupted')} reported changes ({ops.count('enroll')} enrollments, "
          f"{ops.count('rollback')} rollbacks), {kills} kills, {ops.count('interrupted')} of them while a change was "
          f"in flight, {time.time() - start:.0f} s")
    assert ops.count("enroll") and ops.count("rollback") and ops.count("interrupted") >= kills // 2
