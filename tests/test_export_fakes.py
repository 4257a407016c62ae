"""A fake ``tensorrt`` module (8.x or 10.x flavour) recording the builder calls, for tests that
exercise everything up to the TensorRT boundary without TensorRT."""

import types


def make_fake_tensorrt(version="10.3.0", fail_parse=False):
    calls = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            calls.append(("Logger", level))

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

    for obj in (Logger, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, OnnxParser, Builder,
                IInt8EntropyCalibrator2):
        setattr(trt, obj.__name__, obj)
    return trt
