"""Inference backends: one interface, ``infer(frames uint8 NHWC) -> {learner: features}``.

* :class:`TensorRTBackend`: a serialized engine (``.plan``) through the ``tensorrt`` module,
  TensorRT 10 (named I/O tensors: ``set_input_shape``, ``set_tensor_address``,
  ``execute_async_v3``) and 8.x (bindings: ``set_binding_shape``, ``execute_async_v2``).
* :class:`OrtBackend`: ONNX Runtime with the execution providers TensorRT -> CUDA -> CPU,
  filtered by ``onnxruntime.get_available_providers()``.

:func:`open_backend` chooses: ``auto`` takes a TensorRT plan built from this engine's ONNX
(its sha256 in the manifest's ``engines``) when ``tensorrt`` imports, else ONNX Runtime with
the best available provider; ``--backend`` overrides. The choice is logged at start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgecl.core.errors import EdgeclError
from edgecl.core.extras import require

ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CHOICES = ("auto", "trt", "ort", "ort-trt", "ort-cuda", "ort-cpu")


class Backend:
    """``infer(frames)`` -> {learner: float32 [N, d]}; ``name`` says what runs."""

    name = "backend"
    model = ""  # the file that runs (set by open_backend)
    input_size: int = 0

    def check_frames(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        s = self.input_size
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (s, s, 3):
            raise EdgeclError(f"frame of shape {tuple(frames.shape)} ({frames.dtype}) does not fit the engine: it "
                              f"takes uint8 BGR frames of {s}x{s}x3 (resize with edgecl.device.runtime.fit_frame)")
        return np.ascontiguousarray(frames)

    def infer(self, frames: np.ndarray) -> dict:
        raise NotImplementedError


def with_projection(onnx_path, projections: dict) -> bytes | None:
    """The engine's graph plus RanPAC's fixed projection h = ReLU(f W_rand) as extra outputs
    ``projected_<learner>`` (in memory; the hash-bound file is not touched), so the projection
    runs inside the engine call instead of on the host. None when ``onnx`` is not installed."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(onnx_path))
    g = model.graph
    for ln, W in projections.items():
        w = f"edgecl_W_rand_{ln}"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(W, np.float32), w))
        g.node.append(helper.make_node("MatMul", [f"features_{ln}", w], [f"edgecl_proj_{ln}"]))
        g.node.append(helper.make_node("Relu", [f"edgecl_proj_{ln}"], [f"projected_{ln}"]))
        g.output.append(helper.make_tensor_value_info(f"projected_{ln}", onnx.TensorProto.FLOAT, ["batch", W.shape[1]]))
    return model.SerializeToString()


class OrtBackend(Backend):
    def __init__(self, onnx_path, learners: dict, input_size: int, providers=None, threads: int = 0,
                 projections: dict | None = None):
        import onnxruntime as ort

        self.input_size = input_size
        available = ort.get_available_providers()
        wanted = list(providers or ORT_PROVIDERS)
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise EdgeclError(f"ONNX Runtime here offers {', '.join(available)}; none of {', '.join(wanted)} "
                              f"(choose another --backend)")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.outputs = {ln: info.output for ln, info in learners.items()}
        model = str(onnx_path)
        try:
            blob = with_projection(onnx_path, projections) if projections else None
            if blob is not None:
                model = blob
                self.outputs.update({f"{ln}:h": f"projected_{ln}" for ln in projections})
            self.session = ort.InferenceSession(model, so, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - a broken model file: one line
            raise EdgeclError(f"ONNX Runtime cannot load {onnx_path}: {str(exc).splitlines()[0]}; "
                              f"re-run edgecl export") from None
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        self.projected = blob is not None
        self.name = f"onnxruntime {ort.__version__} ({', '.join(self.providers)})" + \
            (", RanPAC projection in the graph" if self.projected else "")

    def infer(self, frames: np.ndarray) -> dict:
        """{learner: features}, plus {"<learner>:h": ReLU(f W_rand)} when the projection is in the graph."""
        frames = self.check_frames(frames)
        names = list(self.outputs.values())
        res = self.session.run(names, {self.input_name: frames})
        return {ln: r for ln, r in zip(self.outputs, res)}


class CudaMemory:
    """Device memory and a stream via cuda-python (``cuda.cudart``), else pycuda."""

    def __init__(self):
        try:
            from cuda import cudart
            self.cudart, self.pycuda = cudart, None
            _err, self.stream = cudart.cudaStreamCreate()
        except ImportError:
            try:
                import pycuda.autoinit  # noqa: F401
                import pycuda.driver as cuda
            except ImportError:
                raise EdgeclError("TensorRT needs cuda-python or pycuda to move data to the GPU (pip install "
                                  "cuda-python); on the device, --backend ort runs without them") from None
            self.cudart, self.pycuda = None, cuda
            self._stream = cuda.Stream()
            self.stream = self._stream.handle
        self._mem = []

    def malloc(self, nbytes: int) -> int:
        if self.cudart is not None:
            _err, ptr = self.cudart.cudaMalloc(nbytes)
            return int(ptr)
        mem = self.pycuda.mem_alloc(nbytes)
        self._mem.append(mem)
        return int(mem)

    def htod(self, ptr: int, array: np.ndarray) -> None:
        if self.cudart is not None:
            self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
        else:
            self.pycuda.memcpy_htod_async(ptr, array, self._stream)

    def dtoh(self, array: np.ndarray, ptr: int) -> None:
        if self.cudart is not None:
            self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        else:
            self.pycuda.memcpy_dtoh_async(array, ptr, self._stream)

    def sync(self) -> None:
        if self.cudart is not None:
            self.cudart.cudaStreamSynchronize(self.stream)
        else:
            self._stream.synchronize()


class TensorRTBackend(Backend):
    """A deserialized TensorRT engine; buffers sized for ``max_batch`` (the plan's profile max)."""

    def __init__(self, plan_path, learners: dict, input_size: int, input_name: str = "input", max_batch: int = 32,
                 cuda_factory: Callable | None = None, trt=None):
        if trt is None:
            import tensorrt as trt
        self.trt, self.input_size, self.input_name, self.max_batch = trt, input_size, input_name, max_batch
        self.v10 = int(trt.__version__.split(".")[0]) >= 10
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EdgeclError(f"TensorRT {trt.__version__} cannot deserialize {plan_path} (built by another TensorRT "
                              f"version or for another GPU?); rebuild it on this board or use --backend ort")
        self.context = self.engine.create_execution_context()
        self.cuda = (cuda_factory or CudaMemory)()
        self.outputs = {ln: info.output for ln, info in learners.items()}
        if not self.v10:
            self.binding = {self.engine.get_binding_name(i): i for i in range(self.engine.num_bindings)}
        self.dims = {ln: self._feature_dim(self.outputs[ln], info.feature_dim) for ln, info in learners.items()}
        in_bytes = max_batch * input_size * input_size * 3
        self.ptr = {input_name: self.cuda.malloc(in_bytes)}
        for ln, out in self.outputs.items():
            self.ptr[out] = self.cuda.malloc(max_batch * max(self.dims[ln], 1) * 4)
        self.name = f"tensorrt {trt.__version__} ({Path(plan_path).name})"

    def _feature_dim(self, name: str, fallback) -> int:
        """The output's last dimension from the engine (TensorRT 10: get_tensor_shape, 8.x:
        get_binding_shape), else the manifest's feature_dim."""
        try:
            shape = (self.engine.get_tensor_shape(name) if self.v10
                     else self.engine.get_binding_shape(self.binding[name]))
            if int(shape[-1]) > 0:
                return int(shape[-1])
        except (AttributeError, KeyError, TypeError):
            pass
        if not fallback:
            raise EdgeclError(f"cannot tell the size of output {name} of the TensorRT engine; re-run edgecl export")
        return int(fallback)

    def infer(self, frames: np.ndarray) -> dict:
        frames = self.check_frames(frames)
        out = {}
        for s in range(0, len(frames), self.max_batch):
            chunk = np.ascontiguousarray(frames[s:s + self.max_batch])
            res = self._run(chunk)
            for ln, r in res.items():
                out.setdefault(ln, []).append(r)
        return {ln: np.concatenate(v) for ln, v in out.items()}

    def _run(self, chunk: np.ndarray) -> dict:
        b = len(chunk)
        shape = tuple(chunk.shape)
        self.cuda.htod(self.ptr[self.input_name], chunk)
        host = {ln: np.empty((b, self.dims[ln]), np.float32) for ln in self.outputs}
        if self.v10:
            self.context.set_input_shape(self.input_name, shape)
            for name, ptr in self.ptr.items():
                self.context.set_tensor_address(name, ptr)
            ok = self.context.execute_async_v3(self.cuda.stream)
        else:
            self.context.set_binding_shape(self.binding[self.input_name], shape)
            bindings = [0] * self.engine.num_bindings
            for name, ptr in self.ptr.items():
                bindings[self.binding[name]] = ptr
            ok = self.context.execute_async_v2(bindings, self.cuda.stream)
        if not ok:
            raise EdgeclError("TensorRT failed to run the engine (see its log above)")
        for ln, out in self.outputs.items():
            self.cuda.dtoh(host[ln], self.ptr[out])
        self.cuda.sync()
        return host


def matching_plan(engine_dir, manifest, trt_version: str | None, precision: str | None = None) -> str | None:
    """The manifest's TensorRT plan built from this engine's ONNX (hash in its name/entry) for
    this TensorRT version (and ``precision`` when given); the best precision first (int8, fp16, fp32)."""
    rank = {"int8": 0, "fp16": 1, "fp32": 2}
    found = []
    for e in manifest.engines:
        sha = manifest.files.get(e.onnx)
        if sha and sha[:12] in e.file and (trt_version is None or e.tensorrt == trt_version) \
                and (precision is None or e.precision == precision) and (Path(engine_dir) / e.file).is_file():
            found.append((rank.get(e.precision, 3), e.file))
    return min(found)[1] if found else None


def open_backend(engine_dir, manifest, choice: str = "auto", threads: int = 0, log: Callable = print,
                 projections: dict | None = None, precision: str | None = None) -> Backend:
    """The backend for ``--backend CHOICE`` (module docstring); logs what was chosen. ``precision``
    picks the model of that precision (default: the one the export was made for); ``backend.model``
    names the file that runs."""
    if choice not in CHOICES:
        raise EdgeclError(f"--backend {choice!r}: choose one of {', '.join(CHOICES)}")
    size = int(manifest.input.size)
    learners = manifest.learners
    if choice in ("auto", "trt"):
        try:
            import tensorrt as trt
        except ImportError:
            trt = None
        plan = matching_plan(engine_dir, manifest, trt.__version__ if trt is not None else None, precision)
        if trt is not None and plan is not None:
            backend = TensorRTBackend(Path(engine_dir) / plan, learners, size, manifest.input.name or "input",
                                      max_batch=int(manifest.batch_range[2]), trt=trt)
            backend.model = plan
            log(f"backend: {backend.name} (--backend {choice})")
            return backend
        if choice == "trt":
            if trt is None:
                require("tensorrt", "--backend trt", hint="or use --backend ort")
            raise EdgeclError(f"--backend trt: no plan for TensorRT {trt.__version__} built from this engine's ONNX is "
                              f"in {engine_dir}; build one with edgecl export BUNDLE --out {engine_dir} --trt "
                              f"(or the trtexec command in the manifest), or use --backend ort")
    providers = {"ort-trt": ORT_PROVIDERS[:1], "ort-cuda": ORT_PROVIDERS[1:2], "ort-cpu": ORT_PROVIDERS[2:]}.get(choice)
    onnx_file = manifest.model_file(precision)
    backend = OrtBackend(Path(engine_dir) / onnx_file, learners, size, providers, threads, projections)
    backend.model = onnx_file
    log(f"backend: {backend.name} (--backend {choice})")
    return backend
