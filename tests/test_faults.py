"""The bad-input and fault campaign, replayed (docs/FAULTS.md lists each class and its test):
data loss refused, crashes turned into one-line errors, silent wrong results made loud or right,
and the security holes closed. Synthetic engine directories and tiny ViT bundles: seconds each."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, class_frames, fresh_copy, invoke, make_engine_dir, make_imagefolder, one_line_error

from edgecl.core.durable import sha256_file
from edgecl.core.formats import SELF_HASH, content_sha256

NOT_UTF8 = os.fsdecode(b"frame-\xff\xfe.png")  # a file name that is not valid UTF-8


def write_pngs(folder: Path, frames, names=None) -> Path:
    """BGR frames as PNG files (through PIL, which opens any file-system name)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        name = names[i] if names else f"{i:03d}.png"
        Image.fromarray(np.ascontiguousarray(f[:, :, ::-1])).save(os.path.join(str(folder), name), format="PNG")
    return folder


def enroll_one(eng, store, name="new", c=7, seed=1):
    folder = write_pngs(Path(store).parent / f"frames-{name}", class_frames(c, 8, seed=seed))
    res = invoke(["enroll", str(eng), "--name", name, "--images", str(folder), "--store", str(store)])
    assert res.exit_code == 0, res.output
    return folder


def rehash(directory: Path, edit=None) -> None:
    """Recompute a directory's manifest hashes after tampering (what a hostile edit would do),
    optionally editing the manifest first."""
    mf = directory / "manifest.json"
    m = json.loads(mf.read_text())
    if edit:
        edit(m)
    for name in m.get("files", {}):
        m["files"][name] = sha256_file(directory / name)
    if SELF_HASH in m:
        m[SELF_HASH] = content_sha256(m)
    mf.write_text(json.dumps(m))


def cli_subprocess(argv, cwd=None):
    """The CLI in a fresh interpreter: a crash (a segfault in a library) shows as a negative status."""
    code = f"from edgecl.cli import main; main({argv!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"}, check=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny RanPAC bundle and its engine directory (trained once for the module)."""
    root = tmp_path_factory.mktemp("faults")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGECL_CACHE", str(root / "cache"))
    data = make_imagefolder(root / "data")
    out = root / "bundle"
    assert invoke(["train", "--data", str(data), "--method", "ranpac", "--out", str(out), *TINY]).exit_code == 0
    eng = root / "engine"
    assert invoke(["export", str(out), "--out", str(eng)]).exit_code == 0
    yield {"root": root, "data": data, "bundle": out, "engine": eng}
    mp.undo()


# ----------------------------------------------------------------------------- data loss

def test_export_onto_an_engine_with_a_store_is_refused_then_sets_the_store_aside(bundle, tmp_path):
    eng = tmp_path / "eng"
    assert invoke(["export", str(bundle["bundle"]), "--out", str(eng)]).exit_code == 0
    enroll_one(eng, eng / "store")
    gens = sorted(p.name for p in (eng / "store").iterdir())
    one_line_error(invoke(["export", str(bundle["bundle"]), "--out", str(eng)]), "holds a device store", "--force")
    assert sorted(p.name for p in (eng / "store").iterdir()) == gens  # untouched
    res = invoke(["export", str(bundle["bundle"]), "--out", str(eng), "--force"])
    assert res.exit_code == 0, res.output
    assert "moved the device store" in res.output
    if (eng / "store").is_dir():  # the same engine again (a deterministic export): the store is back
        assert "its store is back" in res.output and sorted(p.name for p in (eng / "store").iterdir()) == gens
    else:
        (aside,) = tmp_path.glob("eng.store-*")
        assert str(aside) in res.output and sorted(p.name for p in aside.iterdir()) == gens


def test_train_never_replaces_an_engine_directory_or_another_method_s_bundle(bundle, tmp_path):
    eng = fresh_copy(bundle["engine"], tmp_path / "eng")
    enroll_one(eng, eng / "store")
    before = {p.relative_to(eng): p.read_bytes() for p in eng.rglob("*") if p.is_file()}
    train = ["train", "--data", str(bundle["data"]), "--method", "simplecil", *TINY]
    one_line_error(invoke([*train, "--out", str(eng)]), "is an engine directory", "not replaced", quiet=True)
    one_line_error(invoke([*train, "--out", str(eng / "sub")]), "inside the engine directory", quiet=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_line_error(invoke([*train, "--out", str(other)]), "not an edgecl bundle", quiet=True)
    one_line_error(invoke([*train, "--out", str(bundle["bundle"])]), "holds a ranpac bundle", "--force", quiet=True)
    assert {p.relative_to(eng): p.read_bytes() for p in eng.rglob("*") if p.is_file()} == before
    assert (other / "keep.txt").read_text() == "mine"


def test_jsonl_is_never_written_into_an_engine_directory_nor_a_missing_folder(bundle, tmp_path):
    eng = fresh_copy(bundle["engine"], tmp_path / "eng")
    classes = (eng / "classes.json").read_bytes()
    src = str(next((bundle["data"] / "val").iterdir()))
    run = ["run", str(eng), "--source", src, "--headless", "--store", str(tmp_path / "s")]
    one_line_error(invoke([*run, "--jsonl", str(eng / "classes.json")]), "inside the engine directory")
    assert (eng / "classes.json").read_bytes() == classes
    one_line_error(invoke([*run, "--jsonl", str(tmp_path / "no" / "such" / "x.jsonl")]), "does not exist")


# ----------------------------------------------------------------------------- crashes and tracebacks

def test_file_names_that_are_not_utf8_are_read_or_refused_never_a_crash(tmp_path):
    eng = make_engine_dir(tmp_path / "eng")
    frames = write_pngs(tmp_path / "frames", class_frames(7, 6, seed=2), names=[f"{i}-" + NOT_UTF8 for i in range(6)])
    res = cli_subprocess(["enroll", str(eng), "--name", "seven", "--images", str(frames)])
    assert res.returncode == 0 and "committed generation 1" in res.stdout, res.stderr
    res = cli_subprocess(["run", str(eng), "--source", str(frames), "--headless"])
    assert res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1])["frames"] == 6, res.stderr
    video = tmp_path / os.fsdecode(b"clip-\xff.avi")
    video.write_bytes(b"not really a video")
    res = cli_subprocess(["run", str(eng), "--source", str(video), "--headless"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not valid UTF-8" in res.stderr, res.stderr


def test_training_and_eval_read_file_names_that_are_not_utf8(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    data = make_imagefolder(tmp_path / "data")
    for split in ("train", "val"):
        first = sorted((data / split / "class0").iterdir())[0]
        first.rename(first.with_name(NOT_UTF8))
    out = tmp_path / "b"
    res = invoke(["train", "--data", str(data), "--method", "simplecil", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    res = invoke(["eval", str(out), "--data", str(data), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["n"] == 16, res.output
    bad = data / "train" / os.fsdecode(b"class\xff")
    bad.mkdir()
    write_pngs(bad, class_frames(1, 2, size=32))
    one_line_error(invoke(["train", "--data", str(data), "--method", "simplecil", "--out", str(tmp_path / "c"),
                           *TINY]), "class folder", "not valid UTF-8")


def test_damaged_engine_directories_are_one_line_naming_the_artifact(bundle, tmp_path):
    data = str(bundle["data"])
    for key in ("files", "input", "learners"):
        eng = fresh_copy(bundle["engine"], tmp_path / f"no-{key}")
        rehash(eng, lambda m, key=key: m.pop(key))
        one_line_error(invoke(["eval", str(eng), "--data", data]), "manifest.json", repr(key), "edgecl export")
    eng = fresh_copy(bundle["engine"], tmp_path / "list")
    (eng / "manifest.json").write_text("[]")
    one_line_error(invoke(["eval", str(eng), "--data", data]), "not an edgecl engine directory manifest")
    eng = fresh_copy(bundle["engine"], tmp_path / "onnx")
    (eng / "model.fp32.onnx").write_bytes((eng / "model.fp32.onnx").read_bytes()[:1000])
    rehash(eng)
    one_line_error(invoke(["eval", str(eng), "--data", data]), "model.fp32.onnx", "re-run edgecl export")
    eng = fresh_copy(bundle["engine"], tmp_path / "heads")
    (eng / "heads.safetensors").write_bytes((eng / "heads.safetensors").read_bytes()[:100])
    rehash(eng)
    one_line_error(invoke(["eval", str(eng), "--data", data]), "heads.safetensors", "cannot be read", "edgecl export")
    eng = fresh_copy(bundle["engine"], tmp_path / "json")
    (eng / "manifest.json").write_text("{not json")
    line = one_line_error(invoke(["eval", str(eng), "--data", data]), "engine directory", "edgecl export")
    assert "edgecl train" not in line  # it names the artifact that is damaged and what re-creates it


def test_a_damaged_bundle_is_one_line(bundle, tmp_path):
    b = tmp_path / "b"
    import shutil

    shutil.copytree(bundle["bundle"], b)
    (b / "heads.safetensors").write_bytes((b / "heads.safetensors").read_bytes()[:64])
    rehash(b)
    one_line_error(invoke(["eval", str(b), "--data", str(bundle["data"])]), "heads.safetensors", "edgecl train")


@pytest.mark.parametrize("argv, needle", [
    (["--frames", "0"], "--frames 0"), (["--frame-size", "0x0"], "--frame-size"),
    (["--frame-size", "640"], "--frame-size"), (["--enroll-frames", "0"], "--enroll-frames 0"),
    (["--enroll-classes", "-1"], "--enroll-classes -1")])
def test_bench_options_out_of_range_are_one_line(engines, argv, needle):
    one_line_error(invoke(["bench", str(engines["main"]), *argv]), needle, quiet=True)


@pytest.mark.parametrize("k", ["0", "-1"])
def test_top_k_below_one_is_refused(engines, tmp_path, k):
    src = write_pngs(tmp_path / "f", class_frames(1, 2))
    one_line_error(invoke(["run", str(engines["main"]), "--source", str(src), "--headless", "--top-k", k]),
                   f"--top-k {k}", quiet=True)


def test_a_tiny_image_in_a_source_folder_is_skipped_by_name(engines, tmp_path):
    from PIL import Image

    src = write_pngs(tmp_path / "f", class_frames(1, 3))
    Image.new("RGB", (1, 1)).save(src / "001b-tiny.png")
    res = invoke(["run", str(engines["main"]), "--source", str(src), "--headless", "--store", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "skipping" in res.output and "001b-tiny.png" in res.output and "too small" in res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["frames"] == 3


# ----------------------------------------------------------------------------- silent wrong results

def _image_files(tmp_path):
    """A 16-bit PNG, an EXIF-rotated JPEG and a truncated JPEG, with the pixels they must give."""
    from PIL import Image

    rng = np.random.RandomState(0)
    grey16 = (rng.rand(20, 24) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    want16 = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    rgb = rng.randint(0, 255, (20, 30, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(rgb).save(whole, quality=95)
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return want16


def test_one_decode_path_gives_the_same_pixels_and_the_same_refusals(tmp_path):
    from edgecl.data.decode import decode_image
    from edgecl.device.sources import open_source

    want16 = _image_files(tmp_path)
    np.testing.assert_array_equal(decode_image(tmp_path / "deep.png"), want16)  # not all white
    rotated = decode_image(tmp_path / "rotated.jpg")
    assert rotated.shape == (30, 20, 3)  # the EXIF orientation is applied
    for size in (None, 16):  # the device reads files through the same path (BGR frames)
        with open_source(str(tmp_path / "deep.png"), size=size) as src:
            np.testing.assert_array_equal(next(iter(src))[:, :, ::-1], decode_image(tmp_path / "deep.png", size))
        with open_source(str(tmp_path / "rotated.jpg"), size=size) as src:
            np.testing.assert_array_equal(next(iter(src))[:, :, ::-1], decode_image(tmp_path / "rotated.jpg", size))
    from edgecl.core.errors import EdgeclError

    with pytest.raises(EdgeclError, match="cut.jpg.*truncated"):
        decode_image(tmp_path / "cut.jpg")
    with pytest.raises(EdgeclError, match="cut.jpg"):
        open_source(str(tmp_path / "cut.jpg"))


def test_a_truncated_jpeg_is_refused_by_train_and_by_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    _image_files(tmp_path)
    data = make_imagefolder(tmp_path / "data")
    (data / "train" / "class0" / "zz-cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes())
    one_line_error(invoke(["train", "--data", str(data), "--method", "simplecil", "--out", str(tmp_path / "b"),
                           *TINY]), "zz-cut.jpg", "truncated", quiet=True)
    eng = make_engine_dir(tmp_path / "eng")
    only_cut = tmp_path / "cut"
    only_cut.mkdir()
    (only_cut / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes())
    res = invoke(["enroll", str(eng), "--name", "x", "--images", str(only_cut)])
    one_line_error(res, "no usable frames")
    assert "cut.jpg" in res.stdout and "truncated" in res.stdout  # the skipped file is named


def test_eval_of_an_engine_directory_evaluates_what_run_predicts_store_included(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    data = tmp_path / "data"
    for c in range(6):
        write_pngs(data / "val" / f"class{c}", class_frames(c, 5, seed=9))
    write_pngs(data / "val" / "seven", class_frames(7, 5, seed=9))
    before = json.loads(invoke(["eval", str(eng), "--data", str(data), "--json"]).stdout)
    assert before["skipped_classes"] == ["seven"] and before["store_generation"] == 0
    enroll_one(eng, eng / "store", name="seven", c=7)
    invoke(["enroll", str(eng), "--rename", "class0=zero"])
    after = json.loads(invoke(["eval", str(eng), "--data", str(data), "--json"]).stdout)
    assert after["skipped_classes"] == ["class0"] and after["n"] == before["n"]  # seven in, class0 renamed away
    assert after["store"] == str(eng / "store") and after["store_generation"] == 2


def test_an_edited_manifest_is_refused(bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundle["bundle"], b)
    m = json.loads((b / "manifest.json").read_text())
    m["classes"]["names"].reverse()
    (b / "manifest.json").write_text(json.dumps(m))
    one_line_error(invoke(["eval", str(b), "--data", str(bundle["data"])]), "does not match its own hash")
    eng = fresh_copy(bundle["engine"], tmp_path / "eng")
    m = json.loads((eng / "manifest.json").read_text())
    m["input"]["size"] = 64
    (eng / "manifest.json").write_text(json.dumps(m))
    one_line_error(invoke(["eval", str(eng), "--data", str(bundle["data"])]), "does not match its own hash")


@pytest.mark.parametrize("label", ["two\nlines", "\x1b[31mred", "unknown", "UNKNOWN", "  ", "zero\u200bwidth",
                                   "x" * 200])
def test_bad_labels_are_refused_in_one_place(engines, tmp_path, label):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    frames = write_pngs(tmp_path / "f", class_frames(7, 4))
    one_line_error(invoke(["enroll", str(eng), "--name", label, "--images", str(frames)]), "label")
    one_line_error(invoke(["enroll", str(eng), "--rename", f"class1={label}"]), "label")
    one_line_error(invoke(["run", str(eng), "--source", str(frames), "--headless", "--enroll-name", label]), "label")
    assert not (eng / "store").exists()


def test_a_blank_rename_is_refused(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    one_line_error(invoke(["enroll", str(eng), "--rename", "class1= "]), "label is empty")


# ----------------------------------------------------------------------------- security

def test_a_symlink_planted_where_the_store_writes_is_never_followed(engines, tmp_path):
    """Temporary files are created fresh (O_EXCL, random names): a symlink planted at the name an
    earlier edgecl used (``.gen-00000001.safetensors.tmp-<pid>``) does not get its target overwritten."""
    from helpers import runtime

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    store = eng / "store"
    store.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("gen-00000001.safetensors", "gen-00000001.json"):
        (store / f".{name}.tmp-{os.getpid()}").symlink_to(victim)
    rt = runtime(eng, store=store)
    rt.enroll_frames("seven", class_frames(7, 6))
    assert rt.heads.commit() == 1
    assert victim.read_text() == "precious"
    (store / ".lock").unlink()
    (store / ".lock").symlink_to(victim)  # the lock file is not opened through a symlink either
    rt.enroll_frames("eight", class_frames(8, 6))
    with pytest.raises(Exception):  # noqa: B017 - refused (ELOOP), one line at the CLI
        rt.heads.commit()
    assert victim.read_text() == "precious"


def test_a_bundle_cannot_choose_where_eval_writes(bundle, tmp_path, monkeypatch):
    """The bundle's recorded decode-cache folder is not where eval (or export) writes: the cache is
    the user's ($EDGECL_CACHE)."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundle["bundle"], b)
    chosen = tmp_path / "chosen-by-the-bundle"
    rehash(b, lambda m: m["config"]["data"].update(cache_dir=str(chosen)))
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "mine"))
    assert invoke(["eval", str(b), "--data", str(bundle["data"])]).exit_code == 0
    assert invoke(["export", str(b), "--out", str(tmp_path / "eng")]).exit_code == 0
    assert not chosen.exists() and (tmp_path / "mine").is_dir()


def test_a_full_disk_or_a_read_only_store_is_one_line_and_the_store_intact(engines, tmp_path, monkeypatch):
    """Faults injected at the OS boundary of the durable writes (ENOSPC while writing, EROFS when
    creating the temporary file): one line, and the committed generation loads as before."""
    import tempfile

    from edgecl.core import durable

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    enroll_one(eng, eng / "store", name="seven", c=7)
    before = sorted((eng / "store").glob("gen-*"))
    frames = write_pngs(tmp_path / "eight", class_frames(8, 6))
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", full)
    one_line_error(invoke(["enroll", str(eng), "--name", "eight", "--images", str(frames)]), "store",
                   "No space left on device")
    monkeypatch.setattr(durable.os, "fsync", real_fsync)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(durable.tempfile, "mkstemp", read_only)
    one_line_error(invoke(["enroll", str(eng), "--name", "eight", "--images", str(frames)]), "store",
                   "Read-only file system")
    monkeypatch.setattr(durable.tempfile, "mkstemp", tempfile.mkstemp)
    assert sorted((eng / "store").glob("gen-*")) == before
    assert not [p for p in (eng / "store").iterdir() if p.name.endswith(".tmp")]
    listed = invoke(["enroll", str(eng), "--list"])
    assert listed.exit_code == 0 and "seven" in listed.stdout and "eight" not in listed.stdout
