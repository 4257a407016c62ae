import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_imagenet_path():
    """The shared tiny-imagenet-100 (beside the repo, as in CI), or $EDGECL_TINY_IMAGENET."""
    env = os.environ.get("EDGECL_TINY_IMAGENET")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared/data/tiny-imagenet-100"]:
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    return None


@pytest.fixture
def tiny_imagenet():
    path = tiny_imagenet_path()
    if path is None:
        pytest.skip("tiny-imagenet-100 not found (../shared/data/tiny-imagenet-100 or $EDGECL_TINY_IMAGENET)")
    return path
