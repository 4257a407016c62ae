"""Fake third-party modules and devices for tests that run without them (TensorRT and its
CUDA memory, OpenCV captures)."""
