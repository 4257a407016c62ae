"""``edgecl export``: run bundle -> engine directory (see :mod:`edgecl.device.engine_dir`).

1. Load the learner from the bundle (its errors name the file: missing, incomplete, damaged,
   unknown format version).
2. Fold SSF/LoRA into the weights of every learner's feature model, put preprocessing in
   front (uint8 NHWC BGR frame at the bundle's input size) and export one ONNX graph with an
   output per learner (opset 17, dynamic batch), checked with ``onnx.checker`` (full check).
3. Copy heads and statistics (prefixed by learner name) and the class names.
4. Parity report (ONNX Runtime CPU vs PyTorch) on the bundle's val images, else generated ones.
5. Unknown rejection and confidence (:func:`open_set_calibration`): features of held-out training
   images of the engine's classes, the temperature and confidence map fitted on them
   (``openset.safetensors`` and the manifest's ``open_set``; docs/DEVICE.md).
6. ``--precision int8``: ONNX Runtime static QDQ quantization with calibration cache.
7. ``--trt``: TensorRT engines (:mod:`edgecl.export.tensorrt`).
8. Manifest binding every file by sha256; the directory is renamed into place atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgecl import __version__
from edgecl.core.durable import fsync_path, publish_dir, sha256_file, staging_dir, write_json_durable
from edgecl.core.errors import EdgeclError
from edgecl.core.formats import (
    BUNDLE_FIX,
    Aggregation,
    BundleManifest,
    ClassesRef,
    EngineManifest,
    EnginePlan,
    InputSpec,
    LearnerOutput,
    ModelEntry,
    OpenSetCalibration,
    SourceBundle,
    check_output_path,
    load_tensor_file,
    split_learner,
    unpack,
)
from edgecl.core.records import from_dict, to_dict
from edgecl.device.engine_dir import is_engine_dir

PRECISIONS = ("fp32", "fp16", "int8")
CHANNEL_ORDER = "BGR"


def parse_batch_range(text) -> tuple:
    if text is None:
        return (1, 8, 32)
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        try:
            parts = [int(v) for v in str(text).split(",")]
        except ValueError:
            parts = []
    if len(parts) != 3 or not all(isinstance(v, int) and v >= 1 for v in parts) or not parts[0] <= parts[1] <= parts[2]:
        raise EdgeclError(f"--batch-range {text!r}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, e.g. 1,8,32")
    return tuple(parts)


def check_options(precision: str, trt: bool) -> None:
    if precision not in PRECISIONS:
        raise EdgeclError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not trt:
        raise EdgeclError("--precision fp16 needs --trt (ONNX Runtime on the CPU runs fp32 or int8 QDQ); "
                          "add --trt or use --precision fp32|int8")
    if trt:
        from .tensorrt import import_tensorrt

        import_tensorrt()


def _learner_tensors(group: dict, learners: list) -> dict:
    """Bundle tensors -> engine-dir names ``<learner>.<kind>.<name>`` (a single learner's bundle
    tensors have no learner prefix; :mod:`edgecl.core.formats`)."""
    out = {}
    for key, value in group.items():
        if len(learners) == 1 and not key.startswith(f"{learners[0]}."):
            out[f"{learners[0]}.{key}"] = value
        elif key.split(".", 1)[0] in learners:
            out[key] = value
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in out.items()}


def parity_images(manifest: BundleManifest, size: int, count: int, log: Callable) -> tuple:
    """(uint8 RGB images, source description): the bundle's val data if present, else generated."""
    from edgecl.calibration.readers import load_calibration_images

    data = manifest.data_config
    root = data.get("val_root") or data.get("root")
    if root:
        val = Path(root) / "val" if (Path(root) / "val").is_dir() else Path(root)
        if val.is_dir():
            try:
                imgs = load_calibration_images(val, size, count, what="bundle val data")
                return imgs, f"bundle val data {val} ({len(imgs)} images)"
            except EdgeclError as exc:
                log(f"parity: bundle data unusable ({exc}); using generated images")
    rng = np.random.RandomState(0)
    base = rng.randint(0, 256, size=(count, 1, 1, 3))
    imgs = np.clip(base + rng.randn(count, size, size, 3) * 40, 0, 255).astype(np.uint8)
    return imgs, f"generated ({count} seeded random images)"


def export_bundle(bundle, out, precision: str = "fp32", calib_data: Optional[str] = None, calib_count: int = 256,
                  calib_method: str = "minmax", int8_weights: str = "s8-7bit", trt: bool = False, batch_range=None,
                  parity_count: int = 128, workspace_mb: int = 1024, force: bool = False,
                  holdout_data: Optional[str] = None, holdout_per_class: int = 50,
                  accept_rate: Optional[float] = None, log: Callable = print) -> dict:
    """Export ``bundle`` to the engine directory ``out``; returns its manifest.

    An existing engine directory at ``out`` is replaced; one that holds a device store (classes
    enrolled on the device) only with ``force``: its store is first moved to a folder beside it
    (:func:`set_store_aside`) and put back when the new engine has the same identity (same graph,
    heads and statistics), else left there and said.

    Unknown rejection is calibrated on ``holdout_per_class`` held-out training images of each class
    (:func:`open_set_calibration`): ``holdout_data``, else the bundle's training images it did not
    train on; none (or ``holdout_per_class`` 0): the engine rejects nothing unless told a threshold."""
    from safetensors.numpy import save_file

    from edgecl.device.heads import head_class, load_head
    from edgecl.device.openset import DEFAULT_ACCEPT_RATE, check_accept_rate
    from edgecl.train import load_learner

    from .graph import (
        INPUT_NAME,
        OPSET,
        ExportGraph,
        export_onnx,
        folded_feature_models,
        output_name,
        static_same_padding,
    )
    from .parity import parity_report

    check_options(precision, trt)
    accept_rate = check_accept_rate(DEFAULT_ACCEPT_RATE if accept_rate is None else accept_rate)
    if isinstance(holdout_per_class, bool) or not isinstance(holdout_per_class, int) or holdout_per_class < 0:
        raise EdgeclError(f"--holdout-per-class {holdout_per_class!r}: give a count >= 0 (0: no unknown rejection)")
    batch_range = parse_batch_range(batch_range)
    if calib_method not in ("minmax", "entropy", "percentile"):
        raise EdgeclError(f"--calib-method {calib_method!r}: choose minmax, entropy or percentile")
    from .quantize import CPU_WEIGHTS

    if int8_weights not in CPU_WEIGHTS:
        raise EdgeclError(f"--int8-weights {int8_weights!r}: choose {' or '.join(CPU_WEIGHTS)}")
    out = Path(out).resolve()
    if out.exists() and not is_engine_dir(out):
        raise EdgeclError(f"--out {out} exists and is not an engine directory; choose another path or remove it")
    check_output_path(out.parent, "--out", parent_must_exist=False)  # not inside another engine directory
    held = held_store(out)
    if held and not force:
        raise EdgeclError(f"--out {out} holds a device store ({held}): exporting would replace the engine its "
                          f"classes were enrolled into; export to another directory, or pass --force (the store "
                          f"is moved beside it first, and put back if the engine is unchanged)")
    old_identity = _identity(out) if held else None
    start = time.perf_counter()
    learner, bm = load_learner(str(bundle))
    learners = list(learner.feature_models())
    kinds = {ln: bm.learner.head for ln in learners}
    for ln, kind in kinds.items():
        head_class(kind, f"bundle {bundle} (method {bm.method}, learner {ln})")  # a kind the device runs
    size = int(bm.input.size)
    mean, std = bm.input.mean, bm.input.std
    # calibration images first: a missing --calib-data fails before any export work
    frames = _calibration_frames(bm, calib_data, calib_count, size) if precision == "int8" else None

    with staging_dir(out) as tmp:
        # calibration caches travel from a previous export of the same directory (their keys decide)
        if (out / "calibration").is_dir():
            shutil.copytree(out / "calibration", tmp / "calibration")
        graph = ExportGraph(folded_feature_models(learner), mean, std, channel_order=CHANNEL_ORDER)
        static_same_padding(graph, size)
        export_onnx(graph, tmp / "model.fp32.onnx", size)
        log(f"exported model.fp32.onnx: {', '.join(output_name(n) for n in learners)} (opset {OPSET})")

        tensors = _bundle_tensors(bundle)
        heads_np = _learner_tensors(tensors.get("heads", {}), learners)
        stats_np = _learner_tensors(tensors.get("stats", {}), learners)
        save_file(heads_np, str(tmp / "heads.safetensors"))
        if stats_np:
            save_file(stats_np, str(tmp / "stats.safetensors"))
        classes = list(bm.classes.names)
        (tmp / "classes.json").write_text(json.dumps(classes, indent=1))
        per_learner = split_learner(heads_np, learners)
        heads = {ln: load_head(kinds[ln], unpack(per_learner[ln], kinds[ln]), f"bundle {bundle}, learner {ln!r}")
                 for ln in learners}

        imgs, source = parity_images(bm, size, parity_count, log)
        parity = {"fp32": parity_report(learner, tmp / "model.fp32.onnx", imgs, heads, CHANNEL_ORDER, source)}
        models = {"fp32": ModelEntry("model.fp32.onnx", "onnxruntime")}
        if precision == "int8":
            from .quantize import quantize_qdq
            facts = quantize_qdq(tmp / "model.fp32.onnx", tmp / "model.int8.qdq.onnx", frames, tmp / "calibration",
                                 method=calib_method, cpu_weights=int8_weights, input_name=INPUT_NAME, log=log)
            models["int8"] = ModelEntry("model.int8.qdq.onnx", "onnxruntime", extra=facts)
            parity["int8"] = parity_report(learner, tmp / "model.int8.qdq.onnx", imgs, heads, CHANNEL_ORDER, source,
                                           precision="int8")
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2))
        aggregation = (Aggregation(gamma=bm.learner.gamma, predict=bm.learner.inference,
                                   temperatures=dict(bm.learner.temperatures)) if len(learners) > 1 else None)
        open_set = open_set_calibration(tmp, bm, heads, aggregation, holdout_data, holdout_per_class, accept_rate,
                                        log) if holdout_per_class else None
        for p, rep in parity.items():
            log(f"parity {p}: max abs {rep['max_abs']:.3g} (relative {rep['max_rel']:.3g}), "
                f"top-1 agreement {100 * rep['top1_agreement']:.2f}% on {rep['images']} images")

        engines = []
        if trt:
            from .tensorrt import build_for_export
            engines = build_for_export(tmp, precision, batch_range, size, bm, calib_data, calib_count,
                                       frames, workspace_mb=workspace_mb, log=log)

        files = {}
        for f in sorted(tmp.rglob("*")):
            rel = f.relative_to(tmp).as_posix()
            if f.is_file() and rel != "timing.cache" and not rel.startswith("calibration/"):
                files[rel] = sha256_file(f)
        feature_models = learner.feature_models()
        manifest = EngineManifest(
            edgecl_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source_bundle=SourceBundle(path=str(Path(bundle).resolve()),
                                       manifest_sha256=sha256_file(Path(bundle) / "manifest.json"),
                                       A_last=bm.metrics.get("A_last"),
                                       val_per_class=bm.data_config.get("val_per_class")),
            method=bm.method, backbone=to_dict(bm.backbone),
            input=InputSpec(name=INPUT_NAME, size=size, channel_order=CHANNEL_ORDER, mean=list(mean), std=list(std),
                            preprocessing="in graph: (x/255 - mean)/std, channel flip; the device only resizes"),
            learners={ln: LearnerOutput(output=output_name(ln), head=kinds[ln],
                                        feature_dim=getattr(feature_models[ln], "feature_dim", None),
                                        # SLCA family: the alignment the device re-runs to enroll (from the
                                        # bundle's configuration, so older bundles carry it too)
                                        alignment=learner.alignment_spec() if hasattr(learner, "alignment_spec")
                                        else None)
                      for ln in learners},
            # SAFE: what the bundle predicts ("aggregate" of the learners, or one learner alone)
            aggregation=aggregation, open_set=open_set,
            classes=ClassesRef("classes.json", len(classes)),
            precision=precision, opset=OPSET, batch_range=list(batch_range), models=models,
            engines=[from_dict(EnginePlan, e, "the TensorRT build") for e in engines],
            parity={p: {k: r[k] for k in ("max_abs", "max_rel", "top1_agreement", "images")}
                    for p, r in parity.items()},
            files=files,
        )
        write_json_durable(tmp / "manifest.json", manifest.to_json())
        aside = set_store_aside(out, log) if held else None
        publish_dir(tmp, out)
    if aside is not None:
        if old_identity is not None and old_identity == manifest.identity():
            os.replace(aside, out / "store")
            fsync_path(out)
            log(f"the engine is unchanged (same graph, heads and statistics): its store is back in {out / 'store'}")
        else:
            log(f"the device store enrolled into the previous engine is kept in {aside} (it does not fit the new "
                f"engine; re-enroll the classes, or export that engine's bundle again to use it)")
    log(f"engine directory: {out} ({time.perf_counter() - start:.0f} s)")
    return manifest


def holdout_images(bm: BundleManifest, classes: list, size: int, holdout_data, per_class: int) -> tuple:
    """(uint8 RGB images, engine class index of each, source description) of held-out training
    images of the engine's ``classes``: the first ``per_class`` of each class folder of
    ``holdout_data``, else those of the bundle's training folder after the ones it trained on
    (``data.train_per_class``); (None, None, why not) when there are none."""
    from edgecl.calibration.readers import bundle_train_dir
    from edgecl.data.imagefolder import list_images, load_files

    if holdout_data is not None:
        root = Path(holdout_data)
        root = root / "train" if (root / "train").is_dir() else root
        if not root.is_dir():
            raise EdgeclError(f"--holdout-data {holdout_data}: not a folder; pass an ImageFolder of held-out "
                              f"training images (DIR/<class>/<images>) of the engine's classes")
        skip, what = 0, f"--holdout-data {root}"
    else:
        root = bundle_train_dir(bm) if bm.data_config.get("dataset", "imagefolder") == "imagefolder" else None
        skip = bm.data_config.get("train_per_class")
        if root is None:
            return None, None, "the bundle's training images are not here: pass --holdout-data DIR"
        if skip is None:
            return None, None, ("the bundle trained on every training image: pass --holdout-data DIR with images "
                                "of its classes it did not train on")
        what = f"training images of {root} after the first {skip} of each class"
    names, files = [], []
    for c in classes:
        folder = root / c
        got = list_images(folder)[skip:skip + per_class] if folder.is_dir() else []
        if got:
            names.append(c)
            files.append(got)
    if not names:
        return None, None, f"{what}: none of the engine's classes has held-out images there"
    images = load_files(root, names, files, size=size, cache_dir=None, workers=2, progress=False)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[names[y]] for y in images.labels], np.int64)
    return np.asarray(images.images), labels, f"{what} ({len(labels)} images, {len(names)} classes)"


def open_set_calibration(tmp: Path, bm: BundleManifest, heads: dict, aggregation, holdout_data, per_class: int,
                         accept_rate: float, log: Callable) -> Optional[OpenSetCalibration]:
    """Fit the unknown rejection and the confidence of the engine in ``tmp`` on held-out training
    images (edgecl.device.openset) and write ``openset.safetensors``: the images' features per
    learner (float16) and classes, from which the device recomputes the threshold."""
    from safetensors.numpy import save_file

    from edgecl.device.heads import predict
    from edgecl.device.openset import DEFAULT_SCORE, FILE, calibrate, confidence, ece, score_fn, threshold_for

    from .parity import ort_features, ort_session, to_channel_order

    images, labels, source = holdout_images(bm, list(bm.classes.names), int(bm.input.size), holdout_data, per_class)
    if images is None:
        log(f"unknown rejection not calibrated: {source} (without it the device names one of its classes for every "
            f"frame, unless given --unknown-below)")
        return None
    feats = ort_features(ort_session(tmp / "model.fp32.onnx"), to_channel_order(images, CHANNEL_ORDER))
    logits = predict({ln: head.logits(feats[ln]) for ln, head in heads.items()}, aggregation)
    fit = calibrate(logits, labels)
    correct = logits.argmax(1) == labels
    scores = score_fn(DEFAULT_SCORE)(logits, fit["temperature"])
    thr = threshold_for(scores, accept_rate)
    tensors = {f"features.{ln}": np.ascontiguousarray(f.astype(np.float16)) for ln, f in feats.items()}
    tensors["labels"] = labels.astype(np.int32)
    save_file(tensors, str(tmp / FILE))
    errors = {"uncalibrated": ece(confidence(logits), correct),
              "temperature": ece(confidence(logits, fit["temperature"]), correct),
              "calibrated": ece(confidence(logits, fit["temperature"], fit["platt"]), correct)}
    log(f"unknown rejection: {DEFAULT_SCORE} score, threshold {thr:.4g} accepts {100 * accept_rate:g}% of {source}; "
        f"temperature {fit['temperature']:.4g}, confidence ECE on them {errors['calibrated']:.3f} "
        f"(uncalibrated {errors['uncalibrated']:.3f})")
    return OpenSetCalibration(score=DEFAULT_SCORE, accept_rate=float(accept_rate),
                              temperature=float(fit["temperature"]), platt=[float(v) for v in fit["platt"]],
                              file=FILE, images=int(len(labels)), source=source, threshold=float(thr),
                              ece={k: round(float(v), 4) for k, v in errors.items()})


def _identity(engine_dir):
    try:
        return EngineManifest.read(engine_dir).identity()
    except EdgeclError:
        return None


def held_store(engine_dir) -> str:
    """What device state the engine directory's store holds ("" when none): its generations."""
    store = Path(engine_dir) / "store"
    gens = sorted(store.glob("gen-*.json")) if store.is_dir() else []
    return f"{len(gens)} committed generation{'s' if len(gens) != 1 else ''} in {store}" if gens else ""


def set_store_aside(engine_dir, log: Callable = print) -> Path:
    """Move ``ENGINE_DIR/store`` to a new folder beside the directory (an atomic rename: the store
    is in one place or the other at any instant) and say where."""
    engine_dir = Path(engine_dir)
    aside = engine_dir.parent / f"{engine_dir.name}.store-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
    os.replace(engine_dir / "store", aside)
    fsync_path(engine_dir.parent)
    log(f"moved the device store of {engine_dir} to {aside}")
    return aside


def _bundle_tensors(bundle) -> dict:
    from safetensors.torch import load_file

    out = {}
    for stem in ("heads", "stats"):
        f = Path(bundle) / f"{stem}.safetensors"
        if f.is_file():
            out[stem] = load_tensor_file(load_file, f, f"bundle {bundle}", BUNDLE_FIX)
    return out


def _calibration_frames(bm: BundleManifest, calib_data, calib_count: int, size: int) -> np.ndarray:
    """Calibration frames (uint8 NHWC in the graph's channel order)."""
    from edgecl.calibration.readers import bundle_train_dir, load_calibration_images

    if calib_data is None:
        calib_data = bundle_train_dir(bm)
        if calib_data is None:
            raise EdgeclError("--precision int8 needs calibration images: the bundle's training data "
                              f"({bm.data_config.get('root')}) is not here; "
                              "pass --calib-data DIR (an ImageFolder)")
    imgs = load_calibration_images(calib_data, size, calib_count)  # the cache the user set, never the bundle's
    return np.ascontiguousarray(imgs[..., ::-1]) if CHANNEL_ORDER == "BGR" else imgs
