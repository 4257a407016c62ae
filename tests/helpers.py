"""Helpers shared by the test modules (no test module imports another one; fixtures are in
conftest.py, fake third-party modules in fakes/):

* the shared tiny-imagenet-100 and the CLI: :func:`invoke`, :func:`one_line_error`;
* tiny training: the :data:`TINY` CLI options (random-init 2-block ViT at 32 px), generated
  image folders and in-memory image sets;
* the registries a test iterates over (methods, PET kinds), with what the tests know about them;
* synthetic engine directories for the device tests (tiny ONNX graph built with onnx.helper,
  RanPAC heads and statistics solved in numpy): seconds to build, no training.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tiny_imagenet_path():
    """The shared tiny-imagenet-100 (beside the repo, as in CI), or $EDGECL_TINY_IMAGENET."""
    env = os.environ.get("EDGECL_TINY_IMAGENET")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared/data/tiny-imagenet-100"]:
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    return None


# ----------------------------------------------------------------------------- the CLI

def invoke(args):
    """``edgecl ARGS`` in-process; the click Result has ``.stdout`` and ``.stderr`` apart (and
    ``.output``, both interleaved)."""
    from click.testing import CliRunner

    from edgecl.cli import cli

    return CliRunner().invoke(cli, args)


def one_line_error(res, *needles, quiet: bool = False) -> str:
    """A user error: exit status 2, no traceback anywhere, and exactly one line on stderr, which
    starts ``edgecl: error:`` and contains every needle (a command may log progress lines on
    stdout before it fails; ``quiet=True``: it may not, the error is the whole output).
    Returns the error line."""
    shown = f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.exit_code == 2, shown
    assert "Traceback" not in res.output and "Traceback" not in res.stderr, shown
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecl: error:"), shown
    for needle in needles:
        assert str(needle) in lines[0], (needle, shown)
    if quiet:
        assert not res.stdout.strip(), shown
    return lines[0]


# ----------------------------------------------------------------------------- tiny training

TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random",
        "--set", "backbone.kwargs={img_size: 32, patch_size: 8, depth: 2}",
        "--set", "data.input_size=32", "--set", "ranpac.M=64", "--set", "train.batch_size=8",
        "--split", "B0Inc2", "--epochs", "1", "--no-progress"]

# the same backbone as a config section
TINY_VIT = {"name": "vit_tiny_patch16_224", "weights": "random",
            "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}


def blob_images(classes, n=8, seed=0, num_names=4, key="test"):
    """An in-memory ImageSet: per class ``n`` noisy 32x32 images around one random colour."""
    from edgecl.data import ImageSet

    rng = np.random.RandomState(seed)
    imgs, labels = [], []
    for c in classes:
        base = rng.randint(0, 255, size=3)
        imgs.append(np.clip(base + rng.randn(n, 32, 32, 3) * 30, 0, 255).astype(np.uint8))
        labels += [c] * n
    return ImageSet(np.concatenate(imgs), np.array(labels, dtype=np.int64), [f"c{c}" for c in range(num_names)],
                    key=f"{key}-{seed}-{classes}")


def make_imagefolder(root, n_classes=4, n_train=10, n_val=4, size=32, seed=0):
    """Classes that differ by colour and stripe direction, with noise."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c in range(n_classes):
        base = rng.randint(0, 255, size=3)
        for split, n in (("train", n_train), ("val", n_val)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.randn(size, size, 3) * 25, 0, 255)
                img[:: 4 if c % 2 else 1, :: 1 if c % 2 else 4] = 255
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- registries

def methods() -> list:
    """Every method of the learner registry (``edgecl.learners.REGISTRY``), in its order."""
    from edgecl.learners import REGISTRY

    return list(REGISTRY)


# The SLCA family (aligned linear heads, no RanPAC statistics): tests/test_slca.py runs their
# train -> bundle -> eval test with its own checks; every other method runs the generic one.
SLCA_FAMILY = ("seqft", "slca", "slcapp")


def generic_methods() -> list:
    return [m for m in methods() if m not in SLCA_FAMILY]


def pet_kinds() -> list:
    """Every PET kind (``edgecl.pet.KINDS``), in its order."""
    from edgecl.pet import KINDS

    return list(KINDS)


# What the tests know about each PET kind; test_pet checks every kind is classified here.
PET_FOLDED = ("ssf", "lora")  # folded into the wrapped layer: gone after fold_pet
PET_KEPT = ("adapter", "vpt")  # extra modules that stay in the folded model
PET_RANDOM_INIT = ("vpt",)  # not the identity at init (random prompts)
PET_VIT_ONLY = ("vpt",)  # needs a timm VisionTransformer


def cnn_pet_kinds() -> list:
    """The PET kinds a CNN (EfficientNet-Lite0) takes."""
    return [k for k in pet_kinds() if k not in PET_VIT_ONLY]


# ----------------------------------------------------------------------------- synthetic engine dirs
# Class c's frames are noisy images of a class colour pattern; the graph's features are a fixed
# random linear map of the pixels, so the classes are separable and the heads are meaningful.

SIZE = 16
QUIET = {"log": lambda m: None}


def class_frames(c: int, n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """uint8 BGR frames of synthetic class ``c`` (any c >= 0, also classes the engine never saw)."""
    base = np.random.RandomState(1000 + c).randint(0, 256, (4, 4, 3)).astype(np.float64)
    base = np.kron(base, np.ones((size // 4, size // 4, 1)))
    rng = np.random.RandomState(seed * 7919 + c)
    return np.clip(base[None] + rng.randn(n, size, size, 3) * 30, 0, 255).astype(np.uint8)


def labelled_frames(classes, n, seed):
    return np.concatenate([class_frames(c, n, seed=seed) for c in classes]), np.repeat(np.arange(len(classes)), n)


def _graph(path: Path, learners: list, d: int, seed: int = 0) -> dict:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    n_in = SIZE * SIZE * 3
    nodes = [helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["xf", "shape"], ["flat"])]
    inits = [numpy_helper.from_array(np.array([-1, n_in], np.int64), "shape")]
    outputs, mats = [], {}
    for ln in learners:
        P = (rng.randn(n_in, d) / (255.0 * np.sqrt(n_in))).astype(np.float32)
        mats[ln] = P
        inits.append(numpy_helper.from_array(P, f"P_{ln}"))
        nodes.append(helper.make_node("MatMul", ["flat", f"P_{ln}"], [f"features_{ln}"]))
        outputs.append(helper.make_tensor_value_info(f"features_{ln}", TensorProto.FLOAT, ["batch", d]))
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info(
        "input", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return mats


# a small alignment (seconds on a CPU), what an SLCA bundle records (edgecl.core.formats.AlignmentSpec)
LINEAR_ALIGNMENT = {"epochs": 3, "samples_per_class": 32, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                    "weight_decay": 0.0005, "tau": 0.1, "logit_norm": "session", "mean_scale": False,
                    "fc_scale_mu": 0.0, "seed": 7}


def _linear_head(ln: str, f: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> tuple:
    """An SLCA-family learner's tensors for features ``f``: stage-1 heads (normalised class means,
    a stand-in for stage 1), lowrank statistics, and the head aligned from them by the device's
    own alignment (edgecl.core.alignment)."""
    from edgecl.core.alignment import align, draw_epochs, sessions_of
    from edgecl.core.classstats import ClassStats
    from edgecl.core.formats import AlignmentSpec

    stats = ClassStats(f.shape[1], "lowrank", rank=4)
    stats.add(f, labels)
    means = stats.mean.astype(np.float32)
    w1 = means / np.linalg.norm(means, axis=1, keepdims=True)
    b1 = np.zeros(classes, np.float32)
    blocks = [classes // 2, classes - classes // 2]
    spec = AlignmentSpec(**LINEAR_ALIGNMENT)
    rng = np.random.default_rng(seed)
    W, b, _ = align(w1, b1, blocks, draw_epochs(stats, np.arange(classes), sessions_of(blocks), 1, spec, rng), spec)
    heads = {f"{ln}.linear.weight": W, f"{ln}.linear.bias": b, f"{ln}.linear.blocks": np.array(blocks, np.int64),
             f"{ln}.stage1.weight": w1, f"{ln}.stage1.bias": b1, f"{ln}.stage1.blocks": np.array(blocks, np.int64)}
    return heads, {f"{ln}.classstats.{k}": v for k, v in stats.state().items()}


def make_engine_dir(path, learners=("main",), classes: int = 6, per_class: int = 40, d: int = 24, M: int = 64,
                    lam: float = 1.0, gamma: float = 1.0, record_counts: bool = False, seed: int = 0,
                    head: str = "ranpac") -> Path:
    """Write an engine directory (format of edgecl.device.engine_dir) with RanPAC heads and
    statistics, SimpleCIL prototypes (``head="prototypes"``, no statistics) or an SLCA-family
    linear head (``head="linear"``: two sessions, lowrank class statistics, aligned)."""
    from safetensors.numpy import save_file

    from edgecl.core.durable import sha256_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mats = _graph(path / "model.fp32.onnx", list(learners), d, seed)
    frames = np.concatenate([class_frames(c, per_class, seed=1) for c in range(classes)])
    labels = np.repeat(np.arange(classes), per_class)
    heads, stats = {}, {}
    for i, ln in enumerate(learners):
        f = frames.reshape(len(frames), -1).astype(np.float32) @ mats[ln]
        if head == "linear":
            heads_, stats_ = _linear_head(ln, f, labels, classes, seed)
            heads.update(heads_)
            stats.update(stats_)
            continue
        if head == "prototypes":
            heads.update({f"{ln}.prototypes.sums": np.stack([f[labels == c].sum(0) for c in range(classes)]).astype(
                np.float64), f"{ln}.prototypes.counts": np.bincount(labels).astype(np.float64)})
            continue
        W_rand = np.random.RandomState(seed + 10 + i).randn(d, M).astype(np.float32)
        h = np.maximum(f @ W_rand, 0).astype(np.float64)
        Y = np.eye(classes)[labels]
        G, Q = h.T @ h, h.T @ Y
        W = np.linalg.solve(G + lam * np.eye(M), Q)
        heads.update({f"{ln}.ranpac.W": W.astype(np.float32), f"{ln}.ranpac.W_rand": W_rand,
                      f"{ln}.ranpac.lambda": np.array([lam])})
        stats.update({f"{ln}.ranpac.G": G, f"{ln}.ranpac.Q": Q})
        if record_counts:
            stats[f"{ln}.ranpac.counts"] = np.bincount(labels).astype(np.float64)
    save_file(heads, str(path / "heads.safetensors"))
    if stats:
        save_file(stats, str(path / "stats.safetensors"))
    names = [f"class{c}" for c in range(classes)]
    (path / "classes.json").write_text(json.dumps(names))
    files = {n: sha256_file(path / n) for n in ("model.fp32.onnx", "heads.safetensors", "stats.safetensors",
                                                 "classes.json") if (path / n).is_file()}
    manifest = {
        "format": "edgecl-engine", "format_version": 1,
        "method": "slcapp" if head == "linear" else "safe" if len(learners) > 1 else "ranpac",
        "input": {"name": "input", "size": SIZE, "layout": "NHWC", "dtype": "uint8", "channel_order": "BGR",
                  "mean": [0.5] * 3, "std": [0.5] * 3},
        "learners": {ln: {"output": f"features_{ln}", "feature_dim": d, "head": head,
                          **({"alignment": LINEAR_ALIGNMENT} if head == "linear" else {})} for ln in learners},
        "aggregation": {"kind": "entropy", "gamma": gamma} if len(learners) > 1 else None,
        "classes": {"file": "classes.json", "count": classes}, "precision": "fp32", "batch_range": [1, 8, 32],
        "models": {"fp32": {"file": "model.fp32.onnx", "runtime": "onnxruntime"}}, "engines": [], "files": files}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def fresh_copy(src, dst) -> Path:
    """A private copy of a shared engine directory (without its store), for a test to change."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("store"))
    return Path(dst)


def runtime(eng, **kw):
    """An ONNX Runtime (CPU) device runtime of ``eng`` that logs nothing (unless ``log=`` is given)."""
    from edgecl.device.runtime import Runtime

    return Runtime(eng, "ort-cpu", **{**QUIET, **kw})



# ----------------------------------------------------------------------------- edgecl serve

def write_video(path, frames, fps: float = 15.0) -> Path:
    """uint8 BGR ``frames`` [N, H, W, 3] as a lossless (FFV1) .avi."""
    import cv2

    path = Path(path)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (frames.shape[2], frames.shape[1]))
    for f in frames:
        w.write(np.ascontiguousarray(f))
    w.release()
    return path


def serve_process(eng, source, *args, env=None, timeout: float = 60.0):
    """``edgecl serve ENGINE --source SOURCE --port 0 ARGS`` in a subprocess; returns (process,
    base URL, token or None) once it listens (its output up to then is in ``process.lines``)."""
    import subprocess
    import sys
    import time

    code = ("import sys; from edgecl.cli import main; "
            f"main(['serve', {str(eng)!r}, '--source', {str(source)!r}, '--port', '0', '--backend', 'ort-cpu', "
            f"*{list(map(str, args))!r}])")
    p = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    p.lines, url, token = [], None, None
    end = time.monotonic() + timeout
    while url is None:
        line = p.stdout.readline()
        if not line:
            p.wait(5)
            raise AssertionError("edgecl serve exited before listening:\n" + "".join(p.lines))
        p.lines.append(line)
        if line.startswith("token: "):
            token = line.split()[1]
        if line.startswith("edgecl serve: http://"):
            url = line.split()[2].rstrip("/")
        if time.monotonic() > end:
            p.kill()
            raise AssertionError("edgecl serve did not listen in time:\n" + "".join(p.lines))
    if token is None and "--token" in args:
        token = args[list(args).index("--token") + 1]
    return p, url, token


def http(method: str, url: str, body=None, token=None, headers=None, timeout: float = 60.0):
    """One HTTP request with the standard library: (status, headers, body bytes); a dict body is
    sent as JSON."""
    import json as _json
    import urllib.error
    import urllib.request

    headers = dict(headers or {})
    if isinstance(body, dict):
        body = _json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def multipart(fields: dict, files: list) -> tuple:
    """(body, content type) of a multipart/form-data request: ``fields`` {name: text}, ``files``
    [(field, file name, bytes)]."""
    import uuid

    boundary = uuid.uuid4().hex
    out = b""
    for k, v in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").encode()
    for field_name, fname, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{fname}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_bytes(frame) -> bytes:
    """A BGR frame as PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame))
    assert ok
    return buf.tobytes()


class ServeThread:
    """``edgecl serve``'s pieces in this process (uvicorn in a thread, on 127.0.0.1, any port):
    the runtime of ``eng`` (ONNX Runtime CPU), a :class:`~edgecl.device.serve.camera.Camera` on
    ``open_source()``, the service and the app with ``token`` / ``loopback_only`` as a bind to a
    non-loopback host would set them. ``url``, ``rt``, ``camera``, ``service``; ``stop()``."""

    def __init__(self, eng, open_source, token=None, loopback_only=True, fps=30.0, log=None, **service_kw):
        import threading
        import time

        import uvicorn

        from edgecl.device.serve import listen, url_of
        from edgecl.device.serve.app import create_app
        from edgecl.device.serve.camera import Camera
        from edgecl.device.serve.service import Service

        quiet = log or (lambda m: None)
        self.rt = runtime(eng, log=quiet)
        self.camera = Camera(self.rt, open_source, fps=fps, reconnect_s=0.2, log=quiet)
        self.service = Service(self.rt, self.camera, token_required=token is not None, log=quiet, **service_kw)
        app = create_app(self.service, token=token, loopback_only=loopback_only)
        sock = listen("127.0.0.1", 0)
        self.url = url_of(sock).rstrip("/")
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.camera.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.camera.stop()
