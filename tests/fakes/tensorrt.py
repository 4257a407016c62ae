"""A fake ``tensorrt`` module, 8.x or 10.x flavour, for the tests that exercise everything up to
the TensorRT boundary without TensorRT: the exporter's builder (``Builder``, ``OnnxParser``,
builder config, optimisation profiles, timing cache, the 8.x INT8 entropy calibrator) and the
device backend's runtime (``Runtime``, engine, execution context). Every call of interest is
recorded in ``trt.calls``.

Install it with ``monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(...))``; the
runtime side also needs ``edgecl.device.backends.CudaMemory`` replaced by :class:`FakeCuda`.

The version parameter selects the API differences the code under test must handle:

* 10.x: named I/O tensors (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``);
  the engine has no bindings;
* 8.x: bindings (``num_bindings``, ``get_binding_name``, ``set_binding_shape``,
  ``execute_async_v2``) beside the named-tensor calls that 8.5+ also has.
"""

from __future__ import annotations

import types
from typing import ClassVar

import numpy as np


class FakeCuda:
    """Stands in for ``edgecl.device.backends.CudaMemory``: 'device' memory is host arrays in
    :attr:`memory`, keyed by fake pointers."""

    memory: ClassVar[dict] = {}

    def __init__(self):
        self.stream = 7

    def malloc(self, nbytes):
        ptr = 1000 + len(FakeCuda.memory)
        FakeCuda.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def htod(self, ptr, array):
        FakeCuda.memory[ptr][: array.nbytes] = np.ascontiguousarray(array).view(np.uint8).ravel()

    def dtoh(self, array, ptr):
        array.view(np.uint8).ravel()[:] = FakeCuda.memory[ptr][: array.nbytes]

    def sync(self):
        pass


def make_fake_tensorrt(version="10.3.0", fail_parse=False, compute=None):
    """The fake module.

    version: its ``__version__``; major >= 10 gives the 10.x API, else the 8.x one.
    fail_parse: the ONNX parser fails (with one error, "fake parse error").
    compute: ``compute(frames) -> {output name: array}``, what a deserialized engine computes
        (a plan's bytes are its comma-separated output names); only the runtime side needs it.
    """
    calls = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls
    v10 = int(version.split(".")[0]) >= 10

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            calls.append(("Logger", level))

    # ----------------------------------------------------------------------------- builder

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0

    class BuilderFlag:
        FP16 = "FP16"
        INT8 = "INT8"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"timing;"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, lo, opt, hi))
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.int8_calibrator, self.timing_cache = set(), [], None, None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))
            self.flags.add(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def set_calibration_profile(self, p):
            calls.append(("set_calibration_profile",))

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache

        def get_timing_cache(self):
            return self.timing_cache

    class Network:
        pass

    class OnnxParser:
        num_errors = 1 if fail_parse else 0

        def __init__(self, network, logger):
            pass

        def parse(self, blob):
            calls.append(("parse", len(blob)))
            return not fail_parse

        def get_error(self, i):
            return "fake parse error"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calib = config.int8_calibrator
            if calib is not None:  # what TensorRT 8.x does: cache first, else calibrate and write it
                cached = calib.read_calibration_cache()
                calls.append(("calibration_cache_read", cached is not None))
                if cached is None:
                    n = 0
                    while calib.get_batch(["input"]) is not None:
                        n += 1
                    calls.append(("calibrated_batches", n))
                    calib.write_calibration_cache(b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\n")
            calls.append(("build", sorted(config.flags), len(config.profiles)))
            return b"fake-engine"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            calls.append(("calibrator_init",))

    # ----------------------------------------------------------------------------- runtime

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shape = engine, {}, None

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, shape))
            self.shape = shape

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            calls.append(("execute_async_v3",))
            return self._run(self.addr)

        if not v10:
            def set_binding_shape(self, index, shape):
                calls.append(("set_binding_shape", index, shape))
                self.shape = shape

            def execute_async_v2(self, bindings, stream):
                calls.append(("execute_async_v2", len(bindings)))
                return self._run({n: bindings[i] for i, n in enumerate(self.engine.names)})

        def _run(self, addr):
            assert compute is not None, "this fake tensorrt was made without compute="
            mem = FakeCuda.memory
            x = mem[addr["input"]][: int(np.prod(self.shape))].view(np.uint8).reshape(self.shape)
            for name, arr in compute(x).items():
                mem[addr[name]][: arr.nbytes] = arr.astype(np.float32).view(np.uint8).ravel()
            return True

    class Engine:
        def __init__(self, blob):
            self.names = ["input"] + [n for n in blob.decode().split(",")]

        def create_execution_context(self):
            return Context(self)

        if not v10:
            @property
            def num_bindings(self):
                return len(self.names)

            def get_binding_name(self, i):
                return self.names[i]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls.append(("deserialize", len(blob)))
            return Engine(blob) if blob else None

    for obj in (Logger, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, OnnxParser, Builder,
                IInt8EntropyCalibrator2, Runtime):
        setattr(trt, obj.__name__, obj)
    return trt
