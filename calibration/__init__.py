"""INT8 calibration: data readers, calibration caches and their keys (``edgecl.calibration``)."""

from .cache import CacheKey, CalibrationCache  # noqa: F401
from .readers import FrameReader, data_sha256, load_calibration_images  # noqa: F401
