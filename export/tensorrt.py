"""TensorRT engines from the exported ONNX (``edgecl export --trt``), TensorRT 8.x and 10.x.

* fp32 / fp16: parse ``model.fp32.onnx``; fp16 sets ``BuilderFlag.FP16``.
* int8 on TensorRT 10 (explicit quantization): a QDQ model with symmetric int8 activations
  (``model.int8.trt.qdq.onnx``, ONNX Runtime calibration) parsed with ``INT8`` (+ ``FP16``
  for the layers left in float).
* int8 on TensorRT 8.x (JetPack 5, implicit quantization): ``model.fp32.onnx`` with an
  ``IInt8EntropyCalibrator2`` over the calibration frames; its cache is stored under
  ``calibration/trt-entropy2.cache`` with a key (model hash, data hash, method, TensorRT
  version) and only read back when the key matches.

One optimisation profile covers ``--batch-range MIN,OPT,MAX`` on the batch axis; the
builder's timing cache is kept beside the engines (``timing.cache``). Engine files are named
``model.<precision>.trt<version>.<device>.<onnx sha256[:12]>.plan`` so a changed model, a
different TensorRT or another GPU never loads a stale engine. The equivalent ``trtexec`` command
is printed for users who build on the board.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Callable, Optional

from edgecl.calibration import CacheKey, CalibrationCache, data_sha256
from edgecl.core.errors import EdgeclError
from edgecl.core.extras import require
from edgecl.device.engine_dir import sha256_file

INPUT_NAME = "input"


def import_tensorrt():
    return require("tensorrt", "edgecl export --trt",
                   hint="or export without --trt and build the engine on the board with the trtexec command it prints")


def trt_version(trt) -> str:
    return str(getattr(trt, "__version__", "0"))


def trt_major(trt) -> int:
    return int(trt_version(trt).split(".")[0])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def device_tag() -> str:
    """The GPU the engine is built for: $EDGECL_TRT_DEVICE, the Jetson model, nvidia-smi's name."""
    env = os.environ.get("EDGECL_TRT_DEVICE")
    if env:
        return _slug(env)
    model = Path("/proc/device-tree/model")
    if model.is_file():
        try:
            return _slug(model.read_bytes().rstrip(b"\0").decode(errors="ignore"))
        except OSError:
            pass
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()
        if name:
            return _slug(name[0])
    except (OSError, subprocess.SubprocessError):
        pass
    return "gpu"


def engine_name(precision: str, version: str, device: str, onnx_sha256: str) -> str:
    return f"model.{precision}.trt{version}.{_slug(device)}.{onnx_sha256[:12]}.plan"


def trtexec_command(onnx_file: str, engine_file: str, precision: str, batch_range, size: int,
                    workspace_mb: int = 1024, calib_cache: Optional[str] = None, input_name: str = INPUT_NAME) -> str:
    shape = lambda b: f"{input_name}:{b}x{size}x{size}x3"  # noqa: E731
    lo, opt, hi = batch_range
    cmd = [f"trtexec --onnx={onnx_file} --saveEngine={engine_file}", f"--minShapes={shape(lo)}",
           f"--optShapes={shape(opt)}", f"--maxShapes={shape(hi)}", f"--memPoolSize=workspace:{workspace_mb}M",
           "--timingCacheFile=timing.cache"]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]
        if calib_cache:
            cmd.append(f"--calib={calib_cache}")
    return " ".join(cmd)


class _DeviceBuffer:
    """A device allocation for calibration batches, through the device runtime's CUDA helper
    (cuda-python, else pycuda)."""

    def __init__(self, nbytes: int):
        from edgecl.device.backends import CudaMemory

        self.nbytes = nbytes
        self.cuda = CudaMemory()
        self.ptr = self.cuda.malloc(nbytes)

    def upload(self, array) -> int:
        import numpy as np

        self.cuda.htod(self.ptr, np.ascontiguousarray(array))
        self.cuda.sync()
        return int(self.ptr)


def make_entropy_calibrator(trt, frames, cache: CalibrationCache, key: CacheKey, batch_size: int = 16,
                            buffer_factory=_DeviceBuffer, log: Callable = print):
    """An ``IInt8EntropyCalibrator2`` over uint8 ``frames`` whose cache goes through ``cache``/``key``."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.frames, self.batch_size, self.pos = frames, batch_size, 0
            self.buffer = None

        def get_batch_size(self):
            return self.batch_size

        def get_batch(self, names):
            if self.pos + self.batch_size > len(self.frames):
                return None
            batch = self.frames[self.pos:self.pos + self.batch_size]
            self.pos += self.batch_size
            if self.buffer is None:
                self.buffer = buffer_factory(batch.nbytes)
            return [self.buffer.upload(batch)]

        def read_calibration_cache(self):
            path = cache.lookup(key, log=log)
            return path.read_bytes() if path is not None else None

        def write_calibration_cache(self, data):
            cache.store(key, bytes(data))

    return EntropyCalibrator()


def build_engine(trt, onnx_path, engine_path, precision: str, batch_range, size: int, timing_cache_path,
                 workspace_mb: int = 1024, calibrator=None, input_name: str = INPUT_NAME,
                 log: Callable = print) -> None:
    """Build and serialise one engine with the TensorRT Python API."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if trt_major(trt) < 10:  # explicit batch is the only mode on 10.x (flag deprecated)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeclError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    lo, opt, hi = batch_range
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, size, size, 3), (opt, size, size, 3), (hi, size, size, 3))
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    timing_cache_path = Path(timing_cache_path)
    blob = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeclError(f"TensorRT failed to build the {precision} engine from {Path(onnx_path).name} "
                          "(see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_for_export(out_dir: Path, precision: str, batch_range, size: int, bundle_manifest: dict,
                     calib_data, calib_count: int, frames=None, workspace_mb: int = 1024,
                     log: Callable = print, trt=None) -> list:
    """Build the engine for ``precision`` inside the (temporary) engine directory ``out_dir``;
    returns the manifest entries."""
    trt = trt or import_tensorrt()
    version, major, device = trt_version(trt), trt_major(trt), device_tag()
    onnx_file, calibrator, calib_cache = "model.fp32.onnx", None, None
    if precision == "int8":
        from .exporter import _calibration_frames
        if frames is None:
            frames = _calibration_frames(bundle_manifest, calib_data, calib_count, size)
        if major >= 10:
            from .quantize import quantize_qdq
            onnx_file = "model.int8.trt.qdq.onnx"
            quantize_qdq(out_dir / "model.fp32.onnx", out_dir / onnx_file, frames, out_dir / "calibration",
                         symmetric_activations=True, log=log)
        else:
            cache = CalibrationCache(out_dir / "calibration", "trt-entropy2")
            key = CacheKey(sha256_file(out_dir / onnx_file), data_sha256(frames), "entropy2", "tensorrt", version)
            calibrator = make_entropy_calibrator(trt, frames, cache, key, log=log)
            calib_cache = f"calibration/{cache.path.name}"
    onnx_sha = sha256_file(out_dir / onnx_file)
    name = engine_name(precision, version, device, onnx_sha)
    cmd = trtexec_command(onnx_file, name, precision, batch_range, size, workspace_mb, calib_cache)
    log(f"TensorRT {version} on {device}: building {name}")
    log(f"equivalent trtexec command: {cmd}")
    build_engine(trt, out_dir / onnx_file, out_dir / name, precision, batch_range, size, out_dir / "timing.cache",
                 workspace_mb, calibrator, log=log)
    return [{"file": name, "precision": precision, "tensorrt": version, "device": device, "onnx": onnx_file,
             "onnx_sha256": onnx_sha, "batch_range": list(batch_range),
             "quantization": ("explicit-qdq" if major >= 10 else "implicit-entropy2") if precision == "int8" else None,
             "calibration_cache": calib_cache, "trtexec": cmd}]
