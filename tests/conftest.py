"""Fixtures shared by the test modules (plain helpers are in helpers.py, fake third-party
modules in fakes/)."""

import pytest

pytest.register_assert_rewrite("helpers", "fakes")  # their asserts explain themselves like a test's

from helpers import make_engine_dir, make_imagefolder, tiny_imagenet_path  # noqa: E402


@pytest.fixture
def tiny_imagenet():
    path = tiny_imagenet_path()
    if path is None:
        pytest.skip("tiny-imagenet-100 not found (../shared/data/tiny-imagenet-100 or $EDGECL_TINY_IMAGENET)")
    return path


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A generated image folder (4 classes, train/ and val/) with a private decode cache."""
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    return make_imagefolder(tmp_path / "data")


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """Synthetic engine directories, built once per session and shared by the device test
    modules: treat them as read-only (a test that changes one works on ``fresh_copy``).
    main: one RanPAC learner; safe: two (slow, fast); other: like main, another seed."""
    root = tmp_path_factory.mktemp("device")
    return {"main": make_engine_dir(root / "eng-main"), "safe": make_engine_dir(root / "eng-safe", ("slow", "fast")),
            "other": make_engine_dir(root / "eng-other", seed=3), "root": root}
