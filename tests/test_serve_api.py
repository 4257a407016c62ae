"""`edgecl serve`'s HTTP API (edgecl.device.serve): the token on every state-changing call, bad
input as a 4xx with one line, concurrent enrollments serialised and both committed, rollback,
history, store download and merge, the camera that disappears, the CLI's checks.

The server runs in this process (tests/helpers.ServeThread: uvicorn in a thread on 127.0.0.1)
with the security settings a bind beyond loopback gets (a token); test_serve_browser.py and
test_serve_kill.py run the real `edgecl serve` command."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import numpy as np
import pytest
from helpers import (
    ServeThread,
    class_frames,
    fresh_copy,
    http,
    invoke,
    multipart,
    one_line_error,
    png_bytes,
    write_video,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

TOKEN = "test-token-0123456789"


def video_source(path, c=7, n=40, size=64):
    """A factory of sources playing a video of synthetic class ``c`` (what a camera pointed at it gives)."""
    from edgecl.device.sources import open_source

    video = write_video(path, class_frames(c, n, seed=5, size=size))
    return lambda: open_source(str(video), size=16, log=lambda m: None)


@pytest.fixture
def server(engines, tmp_path):
    """A server with a token (as beyond loopback), small limits, on a video of unseen class 7."""
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    srv = ServeThread(eng, video_source(tmp_path / "seven.avi"), token=TOKEN, loopback_only=False, max_images=8,
                      max_upload_bytes=200_000)
    yield srv
    srv.stop()


def call(srv, method, path, body=None, token=TOKEN, **kw):
    status, headers, data = http(method, srv.url + path, body, token=token, **kw)
    return status, (json.loads(data) if headers.get("content-type", "").startswith("application/json") else data)


def error_line(status, body, *needles):
    """A JSON error: one line, holding every needle."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"], body
    for n in needles:
        assert n in body["error"], (n, body)
    return body["error"]


def images(classes=(8,), n=3):
    return [("images", f"c{c}-{i}.png", png_bytes(f)) for c in classes for i, f in enumerate(class_frames(c, n))]


def store_files(eng):
    return {p.relative_to(eng / "store").as_posix(): p.read_bytes() for p in sorted((eng / "store").rglob("*"))
            if p.is_file() and p.name != ".lock"} if (eng / "store").is_dir() else {}


CHANGES = [
    ("POST", "/api/enroll", {"name": "x", "frames": 2}, None),
    ("POST", "/api/enroll/images", "multipart", None),
    ("POST", "/api/rename", {"old": "class1", "new": "one"}, None),
    ("POST", "/api/remove", {"name": "class2"}, None),
    ("POST", "/api/rollback", {"to": 0}, None),
    ("POST", "/api/merge", b"not a tar", {"Content-Type": "application/x-tar"}),
    ("GET", "/api/store", None, None),
]


def test_every_state_changing_call_needs_the_token_and_changes_nothing_without_it(server):
    eng = server.rt.engine_dir
    assert call(server, "POST", "/api/rename", {"old": "class0", "new": "zero"})[0] == 200  # generation 1
    before, classes = store_files(eng), list(server.rt.classes)
    for token in (None, "wrong-token-000000000", TOKEN[:-1], TOKEN + "x"):
        for method, path, body, headers in CHANGES:
            headers = dict(headers or {})
            if body == "multipart":
                body, headers["Content-Type"] = multipart({"name": "x"}, images())
            status, res = call(server, method, path, body, token=token, headers=headers)
            assert status == 401, (token, path, status, res)
            error_line(status, res, "token")
        # a cookie or a token in the query is not the header
        status, _ = call(server, "POST", f"/api/remove?token={TOKEN}", {"name": "class2"}, token=None,
                         headers={"Cookie": f"token={TOKEN}"})
        assert status == 401
    assert store_files(eng) == before and server.rt.classes == classes
    assert server.rt.heads.state.generation == 1
    # reads need no token
    for path in ("/api/status", "/api/classes", "/api/history", "/api/frame.jpg", "/"):
        assert call(server, "GET", path, token=None)[0] == 200, path


def test_bad_input_is_a_4xx_with_a_one_line_reason(server):
    eng = server.rt.engine_dir
    bad_labels = ["", "   ", "a\nb", "tab\there", "\x1b[31mred", "unknown", "x" * 129, 42, None, ["a"]]
    for label in bad_labels:
        status, res = call(server, "POST", "/api/enroll", {"name": label, "frames": 2})
        assert status == 400, (label, res)
        error_line(status, res, "label")
        status, res = call(server, "POST", "/api/rename", {"old": "class1", "new": label})
        assert status == 400, (label, res)
        error_line(status, res, "label")
    body, ctype = multipart({"name": "bad\u202eevil"}, images())
    error_line(*call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype}), "label")
    # oversize and too many
    big = b"x" * 300_000
    status, res = call(server, "POST", "/api/merge", big, headers={"Content-Type": "application/x-tar"})
    assert status == 413
    error_line(status, res, "at most 200000")
    body, ctype = multipart({"name": "many"}, images((8,), n=9))
    status, res = call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype})
    assert status == 413, res
    error_line(status, res, "at most 8")
    status, res = call(server, "POST", "/api/enroll", {"name": "many", "frames": 9})
    assert status == 400 and "1 to 8" in error_line(status, res)
    for frames in (0, -1, "3", 2.5, True):
        assert call(server, "POST", "/api/enroll", {"name": "x", "frames": frames})[0] == 400
    # a file that is not an image refuses the whole request, naming it
    body, ctype = multipart({"name": "broken"}, images() + [("images", "notes.txt", b"hello")])
    status, res = call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype})
    assert status == 400
    error_line(status, res, "notes.txt")
    # bodies that are not what the call takes
    assert call(server, "POST", "/api/rename", b"{not json", headers={"Content-Type": "application/json"})[0] == 400
    assert call(server, "POST", "/api/rename", b"[1, 2]", headers={"Content-Type": "application/json"})[0] == 400
    status, res = call(server, "POST", "/api/enroll/images", {"name": "x"})
    assert status == 415
    error_line(status, res, "multipart")
    # classes and generations that do not exist, or clash
    error_line(*call(server, "POST", "/api/rename", {"old": "nope", "new": "n"}), "no class")
    assert call(server, "POST", "/api/remove", {"name": "nope"})[0] == 404
    status, res = call(server, "POST", "/api/rename", {"old": "class1", "new": "class2"})
    assert status == 409
    error_line(status, res, "already a class")
    body, ctype = multipart({"name": "class3"}, images())
    assert call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype})[0] == 409
    status, res = call(server, "POST", "/api/rollback", {"to": 99})
    assert status == 404
    error_line(status, res, "no generation 99")
    assert call(server, "POST", "/api/rollback", {"to": -1})[0] == 404
    assert call(server, "POST", "/api/rollback", {"to": "1"})[0] == 400
    status, res = call(server, "POST", "/api/rollback", {"to": 0})
    assert status == 409
    error_line(status, res, "current")
    status, res = call(server, "POST", "/api/merge", b"garbage" * 10, headers={"Content-Type": "application/x-tar"})
    assert status == 400
    error_line(status, res, "tar")
    status, res = call(server, "GET", "/api/store")
    assert status == 404
    error_line(status, res, "no generation")
    assert call(server, "GET", "/api/history?limit=0")[0] == 400
    status, res = call(server, "GET", "/api/nothing-here")
    assert status == 404 and "error" in res
    # nothing of that reached the store
    assert not (eng / "store").exists() or not list((eng / "store").glob("gen-*"))


def test_enroll_rename_rollback_history_download_and_merge(server, engines, tmp_path):
    status, res = call(server, "POST", "/api/enroll", {"name": "seven", "frames": 6})
    assert status == 200, res
    assert res["generation"] == 1 and res["frames"] == 6 and len(res["preview"]) == 6
    assert res["preview"][0].startswith("data:image/jpeg;base64,")
    deadline = time.monotonic() + 10
    while call(server, "GET", "/api/status")[1]["camera"]["prediction"]["top"][0][0] != "seven":
        assert time.monotonic() < deadline, "the enrolled class is not recognised on its frames"
        time.sleep(0.1)
    body, ctype = multipart({"name": "eight"}, images((8,), n=4))
    status, res = call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype})
    assert status == 200 and res["generation"] == 2 and res["frames"] == 4, res
    assert call(server, "POST", "/api/rename", {"old": "seven", "new": "gizmo"})[1]["generation"] == 3
    assert call(server, "POST", "/api/remove", {"name": "class0"})[1]["generation"] == 4
    classes = {c["name"]: c for c in call(server, "GET", "/api/classes")[1]}
    assert classes["gizmo"] == {"name": "gizmo", "kind": "enrolled", "samples": 6} and "class0" not in classes
    hist = call(server, "GET", "/api/history")[1]
    assert hist["current"] == 4 and [g["generation"] for g in hist["generations"]] == [4, 3, 2, 1, 0]
    ops = [g["ops"][0]["op"] for g in hist["generations"]]
    assert ops == ["remove", "rename", "enroll", "enroll", "engine"]
    # download the store: a tar that edgecl merge reads
    status, data = call(server, "GET", "/api/store")
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "down", filter="data")
    assert names == ["edgecl-store-4/gen-00000004.safetensors", "edgecl-store-4/gen-00000004.json"]
    res = invoke(["merge", str(tmp_path / "down/edgecl-store-4"), "--out", str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    # roll back to before the first enrollment: a new generation; the classes come back as they were
    status, res = call(server, "POST", "/api/rollback", {"to": 0})
    assert status == 200 and res == {"to": 0, "generation": 5, "classes": 6}, res
    assert server.rt.classes == [f"class{i}" for i in range(6)]
    status, res = call(server, "POST", "/api/rollback", {"to": 3})  # forward again: nothing was lost
    assert status == 200 and res["generation"] == 6
    assert server.rt.classes[-2:] == ["gizmo", "eight"] and "class0" in server.rt.classes
    assert call(server, "GET", "/api/history?limit=2")[1]["generations"][0]["ops"][0] == {
        "op": "rollback", "to": 3, "time": pytest.approx(time.time(), abs=60)}
    # merge another device's store through the API: its class joins, ours stay
    from helpers import runtime

    other = runtime(fresh_copy(engines["main"], tmp_path / "other-eng"), store=tmp_path / "other-store")
    other.enroll_frames("nine", class_frames(9, 6, seed=2))
    other.heads.commit()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "other-store", arcname="other-store")
    status, res = call(server, "POST", "/api/merge", buf.getvalue(), headers={"Content-Type": "application/x-tar"})
    assert status == 200 and res["changed"] and res["generation"] == 7, res
    assert any("'nine'" in line for line in res["report"])
    assert server.rt.classes[-3:] == ["gizmo", "eight", "nine"]
    status, res = call(server, "POST", "/api/merge", buf.getvalue(), headers={"Content-Type": "application/x-tar"})
    assert status == 200 and not res["changed"] and res["generation"] == 7  # idempotent: nothing new
    # what the server reported is what a fresh process loads
    fresh = runtime(server.rt.engine_dir)
    assert fresh.classes == server.rt.classes and fresh.heads.state.generation == 7


def test_two_concurrent_enrollments_are_serialised_and_both_committed(server):
    results = {}

    def live():
        results["live"] = call(server, "POST", "/api/enroll", {"name": "live", "frames": 8})

    def upload():
        body, ctype = multipart({"name": "upload"}, images((9,), n=4))
        results["upload"] = call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype})

    threads = [threading.Thread(target=live), threading.Thread(target=upload)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["live"][0] == 200 and results["upload"][0] == 200, results
    assert sorted([results["live"][1]["generation"], results["upload"][1]["generation"]]) == [1, 2]
    # another process commits behind the server's back; the next change builds on it, nothing lost
    res = invoke(["enroll", str(server.rt.engine_dir), "--rename", "class5=five"])
    assert res.exit_code == 0, res.output
    body, ctype = multipart({"name": "third"}, images((10,), n=3))
    status, res = call(server, "POST", "/api/enroll/images", body, headers={"Content-Type": ctype})
    assert status == 200 and res["generation"] == 4, res
    from helpers import runtime

    names = runtime(server.rt.engine_dir).classes
    assert {"live", "upload", "five", "third"} <= set(names) and "class5" not in names


def test_the_stream_sends_the_newest_annotated_frames(server):
    import http.client

    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=10)
    conn.request("GET", "/api/stream.mjpg")
    res = conn.getresponse()
    assert res.status == 200 and res.getheader("Content-Type").startswith("multipart/x-mixed-replace")
    seqs = []
    for _ in range(3):
        assert res.readline().strip() == b"--edgecl-frame"
        head = {}
        while (line := res.readline().strip()):
            k, _, v = line.decode().partition(":")
            head[k.lower()] = v.strip()
        jpeg = res.read(int(head["content-length"]))
        res.readline()
        assert jpeg[:2] == b"\xff\xd8" and head["content-type"] == "image/jpeg"
        assert 0 <= time.time() - float(head["x-captured-at"]) < 5
        seqs.append(int(head["x-frame-seq"]))
    conn.close()
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert server.camera.status()["latency"]["host_ms_median"] is not None


def test_the_camera_that_disappears_is_reported_and_the_server_keeps_serving(engines, tmp_path):
    """A live camera stops delivering frames and cannot be reopened for a while: the status says
    'lost' (the page shows it), the API goes on answering, and the frames come back with it."""
    from fakes.capture import FakeCapture

    from edgecl.device.sources import CaptureSource

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    unplugged = threading.Event()

    class Camera(FakeCapture):  # cannot be opened, nor read, while unplugged
        def __init__(self):
            super().__init__(opened=not unplugged.is_set())

        def read(self):
            return (False, None) if unplugged.is_set() else super().read()

    def open_source():
        return CaptureSource("fake://cam", Camera, live=True, reconnect=2, backoff_s=0.05, log=lambda m: None)

    srv = ServeThread(eng, open_source)
    try:
        deadline = time.monotonic() + 10
        while srv.camera.status()["state"] != "live" or srv.camera.status()["frames"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        unplugged.set()
        deadline = time.monotonic() + 15
        while (st := call(srv, "GET", "/api/status", token=None)[1])["camera"]["state"] != "lost":
            assert time.monotonic() < deadline, st["camera"]
            time.sleep(0.1)
        assert st["camera"]["message"]
        assert call(srv, "GET", "/api/history", token=None)[0] == 200
        status, res = call(srv, "POST", "/api/enroll", {"name": "while-lost", "frames": 2}, token=None)
        assert status == 503, res
        error_line(status, res, "camera", "nothing enrolled")
        status, res = call(srv, "GET", "/api/frame.jpg", token=None)
        assert status == 503
        frames = st["camera"]["frames"]
        unplugged.clear()  # plugged back in: the server reopens it
        deadline = time.monotonic() + 15
        while (st := call(srv, "GET", "/api/status", token=None)[1])["camera"]["state"] != "live" or \
                st["camera"]["frames"] <= frames:
            assert time.monotonic() < deadline, st["camera"]
            time.sleep(0.1)
        assert not (eng / "store").exists() or not list((eng / "store").glob("gen-*"))
    finally:
        srv.stop()


def test_loopback_without_a_token_refuses_other_hosts_and_cross_site_requests(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    srv = ServeThread(eng, video_source(tmp_path / "v.avi"))
    try:
        assert call(srv, "GET", "/api/status", token=None)[0] == 200
        port = srv.url.rsplit(":", 1)[1]
        status, res = call(srv, "GET", "/api/status", token=None, headers={"Host": f"evil.example:{port}"})
        assert status == 403
        error_line(status, res, "loopback")
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            status, res = call(srv, "POST", "/api/rename", {"old": "class1", "new": "one"}, token=None,
                               headers=headers)
            assert status == 403, res
            error_line(status, res, "cross-site")
        assert srv.rt.classes[1] == "class1"
        origin = {"Origin": srv.url}  # the page itself
        status, res = call(srv, "POST", "/api/rename", {"old": "class1", "new": "one"}, token=None, headers=origin)
        assert status == 200 and res["generation"] == 1
        status, headers, _ = http("GET", srv.url + "/")
        assert "script-src 'self'" in headers["content-security-policy"]
    finally:
        srv.stop()


def test_cli_serve_checks_before_serving_and_generates_a_token_beyond_loopback(engines, tmp_path, monkeypatch):
    import edgecl.device.serve as serve_mod

    real_listen = serve_mod.listen
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(class_frames(7, 1)[0]))
    one_line_error(invoke(["serve", str(eng), "--source", str(tmp_path / "nowhere")]), "--source")
    one_line_error(invoke(["serve", str(eng), "--source", str(folder), "--port", "70000"]), "--port")
    one_line_error(invoke(["serve", str(eng), "--source", str(folder), "--max-images", "0"]), "--max-images")
    one_line_error(invoke(["serve", str(eng), "--source", str(folder), "--token", "short"]), "--token")
    ran = {}

    class NoServer:
        def __init__(self, config):
            ran["app"] = config.app

        def run(self, sockets):
            ran["sockets"] = sockets

    monkeypatch.setattr("uvicorn.Server", NoServer)
    monkeypatch.setattr(serve_mod, "listen", lambda host, port: serve_mod.socket.create_server(("127.0.0.1", 0)))
    res = invoke(["serve", str(eng), "--source", str(folder), "--host", "0.0.0.0", "--backend", "ort-cpu"])
    assert res.exit_code == 0, res.output
    token = next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("token: "))
    assert len(token) >= 24 and "generated one" in res.stdout
    assert ran["app"].token == token and not ran["app"].loopback_only
    res = invoke(["serve", str(eng), "--source", str(folder), "--backend", "ort-cpu"])
    assert res.exit_code == 0 and "token:" not in res.stdout and ran["app"].token is None
    # a port in use is one line
    import socket

    monkeypatch.setattr(serve_mod, "listen", real_listen)
    busy = socket.create_server(("127.0.0.1", 0))
    one_line_error(invoke(["serve", str(eng), "--source", str(folder), "--backend", "ort-cpu", "--port",
                           str(busy.getsockname()[1])]), "cannot listen")
    busy.close()


def test_a_missing_web_dependency_is_one_line_naming_the_extra(tmp_path):
    import subprocess
    import sys

    for blocked in ("starlette", "uvicorn", "python_multipart"):
        code = (f"import sys; sys.modules[{blocked!r}] = None\n"
                "from edgecl.cli import main\n"
                "main(['serve', 'no-engine', '--source', 'nowhere'])\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert f"({blocked})" in lines[0] and "pip install 'edgecl[device]'" in lines[0], lines[0]


def test_help_does_not_import_the_web_stack():
    import subprocess
    import sys

    code = ("import sys\nfrom edgecl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert not {'starlette', 'uvicorn', 'edgecl.device.serve'} & set(sys.modules), sorted(sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_previews_are_the_captured_frames(server):
    import base64

    import cv2

    status, res = call(server, "POST", "/api/enroll", {"name": "seven", "frames": 3})
    assert status == 200
    img = cv2.imdecode(np.frombuffer(base64.b64decode(res["preview"][0].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (16, 16, 3)  # the frames as the model saw them
