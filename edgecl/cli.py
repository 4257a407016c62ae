"""The ``edgecl`` command line. Imports are lazy: ``edgecl --help`` does not import torch."""

from __future__ import annotations

import json
import sys

import click

from .core.errors import EdgeclError
from .core.extras import missing_message, require_all
from .learners import REGISTRY as LEARNERS

# what the commands import beyond the base install, checked before any work (edgecl/core/extras.py)
LOAD_BUNDLE = ("torch", "torchvision", "timm")
TRAIN = LOAD_BUNDLE + ("matplotlib",)
EXPORT = LOAD_BUNDLE + ("onnx", "onnxruntime")
ENGINE = ("onnxruntime",)
DEVICE = ("cv2", "onnxruntime")
SERVE = DEVICE + ("starlette", "uvicorn", "python_multipart")
DEMO = TRAIN + ("sklearn", "scipy", "onnx") + DEVICE


class UserError(click.ClickException):
    """An :class:`EdgeclError` shown as one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"edgecl: error: {self.message}", err=True)


class RegistryOption(click.Option):
    """An option whose help lists a registry's names as they are when the help is shown."""

    def __init__(self, *args, registry: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.registry, self.base_help = registry, self.help

    def get_help_record(self, ctx):
        self.help = f"{self.base_help}: {', '.join(self.registry)}."
        return super().get_help_record(ctx)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeclError as exc:
            raise UserError(str(exc)) from None
        except ModuleNotFoundError as exc:  # an optional dependency the command's checks did not name
            msg = missing_message(exc.name, f"edgecl {ctx.invoked_subcommand}")
            if msg is None:
                raise
            raise UserError(msg) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgecl")
def cli():
    """edgecl: an edge continual learner.

    Train a pretrained backbone class-incrementally (SAFE, SLCA++, RanPAC, SimpleCIL), export
    it to ONNX/TensorRT, and run it on a device that keeps enrolling new classes.
    """


@cli.command()
@click.option("--data", "data", help="ImageFolder root with train/ and val/ (or the download folder for "
                                    "--dataset cifar100|imagenet-r).")
@click.option("--val-data", help="A separate ImageFolder to evaluate on (then --data is the training folder).")
@click.option("--dataset", type=str, help="imagefolder (default), cifar100 or imagenet-r.")
@click.option("--method", required=True, cls=RegistryOption, registry=LEARNERS, help="The learner")
@click.option("--profile", help="quick (CPU, minutes) or full (GPU, the papers' settings).")
@click.option("--backbone", help="A timm model name (default tf_efficientnet_lite0, weights embedded).")
@click.option("--weights", help="Backbone weights: a state-dict file, 'random', or 'default' (embedded).")
@click.option("--pretrained", is_flag=True, help="Download the backbone's pretrained weights from the hub (online).")
@click.option("--split", help="Class-incremental split B{base}Inc{K}, e.g. B0Inc10.")
@click.option("--seed", type=int, help="Seed of the class order and of training (default 1993).")
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--device", help="auto, cpu or cuda[:N].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML file of overrides.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set ranpac.M=2048.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write the run bundle.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace a bundle of another method at --out.")
def train(data, val_data, dataset, method, profile, backbone, weights, pretrained, split, seed, epochs, device,
          config_file, sets, out, no_progress, force):
    """Train METHOD over class-incremental sessions and write a run bundle."""
    from .config import parse_set, resolve_config

    require_all(TRAIN, "edgecl train")

    overrides = parse_set(sets)

    def put(section, key, value):
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("data", "root", data)
    put("data", "val_root", val_data)
    put("data", "dataset", dataset)
    put("data", "split", split)
    put("backbone", "name", backbone)
    if pretrained and weights:
        raise EdgeclError("--pretrained and --weights both given; pass one")
    put("backbone", "weights", "pretrained" if pretrained else weights)
    put("train", "epochs", epochs)
    put("train", "device", device)
    if seed is not None:
        overrides["seed"] = seed
    cfg = resolve_config(method, profile, config_file, overrides)
    if not cfg.data.root:
        raise EdgeclError("no training data: pass --data DIR (an ImageFolder with train/ and val/)")
    from .train import train as run_train

    metrics = run_train(cfg, out, progress=not no_progress, force=force, log=click.echo)
    from .distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 speaks for the run
        return
    click.echo(f"A_last {metrics['A_last']:.2f}  A_avg {metrics['A_avg']:.2f}  "
               f"forgetting {metrics['forgetting']:.2f}  ({metrics['time_s']:.0f} s: learning "
               f"{metrics['learn_s']:.0f} s, per-session test {metrics['eval_s']:.0f} s)")
    click.echo(f"bundle: {out}")


@cli.command(name="eval")
@click.argument("path", type=click.Path())
@click.option("--data", required=True, help="ImageFolder root (its SPLIT sub-folder is used when present).")
@click.option("--split", default="val", show_default=True)
@click.option("--per-class", type=int, help="First N images per class (default: as the bundle was evaluated).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Engine directory only: which model to run (default: the one the export was made for).")
@click.option("--backend", help="Engine directory only: as for edgecl run (default auto).")
@click.option("--store", type=click.Path(file_okay=False),
              help="Engine directory only: the class-statistics store (default ENGINE_DIR/store).")
@click.option("--unknown-data", type=click.Path(),
              help="Engine directory only: an ImageFolder of classes the engine does not know; adds the open_set "
                   "report (AUROC, FPR at 95% TPR, the max-softmax baseline, accept and reject rates).")
@click.option("--accept-rate", type=float, help="Engine directory only: as for edgecl run (default: the engine's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(path, data, split, per_class, precision, backend, store, unknown_data, accept_rate, as_json):
    """Top-1 accuracy of a bundle (or engine directory) on an ImageFolder.

    An engine directory is evaluated as the device predicts: the backend edgecl run takes,
    the heads with the classes its store has enrolled, renamed or removed."""
    from .core.formats import EngineManifest, artifact_format

    if artifact_format(path) == EngineManifest.FORMAT:
        require_all(ENGINE, "edgecl eval ENGINE_DIR")
        from .device.evaluate import evaluate_engine_dir

        result = evaluate_engine_dir(path, data, split, per_class, precision=precision, backend=backend or "auto",
                                     store=store, progress=not as_json, unknown_data=unknown_data,
                                     accept_rate=accept_rate,
                                     log=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    else:
        for flag, value in (("--precision", precision), ("--backend", backend), ("--store", store),
                            ("--unknown-data", unknown_data), ("--accept-rate", accept_rate)):
            if value:
                raise EdgeclError(f"{flag} applies to engine directories; {path} is a bundle")
        require_all(LOAD_BUNDLE, "edgecl eval BUNDLE")
        from .train import evaluate

        result = evaluate(path, data, split, per_class, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"accuracy {result['accuracy']:.2f} on {result['n']} images of {result['classes']} classes")
        if "ece" in result:
            click.echo(f"confidence ECE {result['ece']:.3f} (uncalibrated {result['ece_uncalibrated']:.3f})")
        op = result.get("open_set")
        if op:
            line = (f"unknowns ({op['unknown']} images): {op['score']} AUROC {op['auroc']:.3f} (max-softmax "
                    f"{op['auroc_msp']:.3f}), FPR at 95% TPR {op['fpr_at_95tpr']:.3f}")
            if op.get("accept_rate") is not None:
                line += (f"; accepted {100 * op['accept_rate']:.1f}% of known images, rejected "
                         f"{100 * op['unknown_rejected']:.1f}% of unknown ones")
            click.echo(line)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The engine directory to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="int8: ONNX Runtime QDQ model (and TensorRT INT8 with --trt); fp16 needs --trt.")
@click.option("--calib-data", type=click.Path(),
              help="ImageFolder for INT8 calibration (default: the bundle's training data).")
@click.option("--calib-count", type=int, default=256, show_default=True,
              help="Calibration images (round-robin over classes).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--int8-weights", type=click.Choice(["s8-7bit", "u8"]), default="s8-7bit", show_default=True,
              help="CPU INT8 model's weights: int8 in 7 bits (fast ONNX Runtime kernels, no saturation on x86 "
                   "without VNNI) or uint8 (closest to fp32, no fast x86 kernel). TensorRT's QDQ model is int8.")
@click.option("--batch-range", default="1,8,32", show_default=True, metavar="MIN,OPT,MAX",
              help="TensorRT optimisation profile for the batch axis.")
@click.option("--workspace-mb", type=int, default=1024, show_default=True, help="TensorRT builder workspace.")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs the tensorrt module and a GPU).")
@click.option("--force", is_flag=True,
              help="Replace an engine directory that holds a device store (the store is moved beside it first).")
@click.option("--holdout-data", type=click.Path(),
              help="ImageFolder of held-out training images of the engine's classes to calibrate unknown rejection "
                   "and confidence on (default: the bundle's training images it did not train on).")
@click.option("--holdout-per-class", type=int, default=50, show_default=True,
              help="Held-out images per class for that calibration (0: no unknown rejection).")
@click.option("--accept-rate", type=float, default=0.95, show_default=True,
              help="The engine's default share of known-class images to accept (edgecl run can change it).")
def export(bundle, out, precision, calib_data, calib_count, calib_method, int8_weights, batch_range, workspace_mb, trt,
           force, holdout_data, holdout_per_class, accept_rate):
    """Fold PET into the backbone and export ONNX / TensorRT engines to an engine directory."""
    require_all(EXPORT, "edgecl export")
    from .export.exporter import export_bundle

    export_bundle(bundle, out, precision=precision, calib_data=calib_data, calib_count=calib_count,
                  calib_method=calib_method, int8_weights=int8_weights, trt=trt, batch_range=batch_range,
                  workspace_mb=workspace_mb, force=force, holdout_data=holdout_data,
                  holdout_per_class=holdout_per_class, accept_rate=accept_rate, log=click.echo)


_BACKEND = click.option("--backend", default="auto", show_default=True,
                        help="auto (TensorRT plan if usable, else ONNX Runtime TensorRT->CUDA->CPU), trt, ort, "
                             "ort-trt, ort-cuda or ort-cpu.")
_ACCEPT_RATE = click.option("--accept-rate", type=float,
                            help="Share of known-class images to accept (default: the engine's, 0.95); the rest, and "
                                 "what the engine never learned, is called 'unknown'. The threshold follows every "
                                 "enrollment, rename and removal.")
_UNKNOWN_BELOW = click.option("--unknown-below", type=float,
                              help="Experts: a raw threshold on the engine's rejection score instead of --accept-rate.")
_STORE = click.option("--store", type=click.Path(file_okay=False),
                      help="The class-statistics store (default ENGINE_DIR/store).")


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--name", help="Label of the class to enroll (new, or more frames for an enrolled class).")
@click.option("--images", type=click.Path(), help="A folder of images of the class.")
@click.option("--source", help="A camera/stream/video/folder to take frames from (with --frames).")
@click.option("--frames", type=int, help="How many frames to take from --source.")
@click.option("--rename", "renames", multiple=True, metavar="OLD=NEW", help="Rename a class.")
@click.option("--remove", "removes", multiple=True, metavar="LABEL", help="Remove a class.")
@click.option("--list", "list_classes", is_flag=True, help="Print the classes and exit.")
@click.option("--views", default="id,flip,crop,cropflip", show_default=True,
              help="Augmented views per frame (their features are averaged into one row): id, flip, crop, cropflip.")
@click.option("--weighting", type=click.Choice(["default", "uncalibrated", "aligned", "plain"]),
              help="Class weighting of a new store (docs/DEVICE.md); an existing store keeps its own.")
@_BACKEND
@_STORE
def enroll(engine_dir, name, images, source, frames, renames, removes, list_classes, views, weighting, backend, store):
    """Enroll a new class on the device from images or camera frames (and rename/remove classes).

    RanPAC/SAFE heads are updated in closed form (rank-k update of G and Q, each class's target
    column normalised by its count), an SLCA-family linear head by re-running its classifier
    alignment over the class statistics; the store commits a new generation all-or-nothing."""
    require_all(DEVICE, "edgecl enroll")
    from .device.runtime import Runtime

    if not (name or renames or removes or list_classes):
        raise EdgeclError("nothing to do: pass --name LABEL with --images DIR or --source SRC --frames N, "
                          "or --rename OLD=NEW / --remove LABEL / --list")
    if name and bool(images) == bool(source):
        raise EdgeclError("--name needs exactly one of --images DIR or --source SRC --frames N")
    if source and (frames is None or frames < 1):
        raise EdgeclError("--source needs --frames N (N >= 1): how many frames to enroll")
    if (images or source) and not name:
        raise EdgeclError("--images/--source need --name LABEL")
    from pathlib import Path

    if images and not Path(images).is_dir():
        raise EdgeclError(f"--images {images}: not a folder of images")
    if name is not None:
        from .core.labels import check_label

        name = check_label(name, "--name")
    from .device.enroll import POLICIES

    rt = Runtime(engine_dir, backend, store=store, policy=POLICIES[weighting] if weighting else None, log=click.echo)
    if list_classes:
        for i, c in enumerate(rt.classes):
            click.echo(f"{i}\t{c}")
        return
    if name:
        rt.heads.check_enrollable()  # before any rename or remove
    for spec in renames:
        old, sep, new = spec.partition("=")
        if not sep or not old or not new:
            raise EdgeclError(f"--rename {spec!r}: expected OLD=NEW")
        rt.heads.rename(old, new)
    for label in removes:
        rt.heads.remove(label)
    if name:
        info = rt.enroll_source(name, images or source, max_frames=None if images else frames,
                                views=tuple(v.strip() for v in views.split(",") if v.strip()))
        click.echo(f"enrolled {name!r}: {info['frames']} frames ({info['rows']} rows), features "
                   f"{info['features_ms']:.0f} ms, head update {info['update_ms']:.1f} ms")
    gen = rt.heads.commit()
    click.echo(f"committed generation {gen} of {rt.heads.store.path} ({len(rt.classes)} classes)")


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--source", required=True, help="/dev/videoN, N, csi://N, rtsp://..., a video file or an image folder.")
@click.option("--headless", is_flag=True, help="No window.")
@click.option("--jsonl", type=click.Path(dir_okay=False), help="Write one JSON line per frame.")
@click.option("--max-frames", type=int, help="Stop after N frames.")
@click.option("--top-k", type=int, default=3, show_default=True)
@_ACCEPT_RATE
@_UNKNOWN_BELOW
@click.option("--enroll-frames", type=int, default=20, show_default=True, help="Frames the 'e' key enrolls.")
@click.option("--enroll-name", help="Label for the class the 'e' key enrolls (default class-N).")
@_BACKEND
@_STORE
def run(engine_dir, source, headless, jsonl, max_frames, top_k, accept_rate, unknown_below, enroll_frames, enroll_name,
        backend, store):
    """The camera loop: capture, infer, aggregate, overlay."""
    require_all(DEVICE, "edgecl run")
    from .core.formats import check_output_path
    from .core.labels import check_label
    from .device.loop import run_loop
    from .device.runtime import Runtime
    from .device.sources import open_source, parse_source

    at_least("--max-frames", max_frames, 1)
    at_least("--top-k", top_k, 1)
    at_least("--enroll-frames", enroll_frames, 1)
    if enroll_name is not None:
        enroll_name = check_label(enroll_name, "--enroll-name")
    if jsonl:
        check_output_path(jsonl, "--jsonl")
    parse_source(source)  # a bad --source fails before the engine loads
    rt = Runtime(engine_dir, backend, store=store, accept_rate=accept_rate, unknown_below=unknown_below,
                 log=click.echo)
    click.echo(rt.open_set_line())
    src = open_source(source, size=rt.size, log=click.echo)
    with src:
        summary = run_loop(rt, src, headless=headless, jsonl=jsonl, max_frames=max_frames, k=top_k,
                           enroll_frames=enroll_frames, enroll_name=enroll_name, log=click.echo)
    click.echo(json.dumps(summary))


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--source", required=True, help="/dev/videoN, N, csi://N, rtsp://..., a video file or an image folder "
                                              "(files and folders play in a loop).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback a token is required (generated if not given).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--token", envvar="EDGECL_SERVE_TOKEN", show_envvar=True,
              help="What state-changing calls must send as 'Authorization: Bearer TOKEN'.")
@click.option("--top-k", type=int, default=3, show_default=True)
@_ACCEPT_RATE
@_UNKNOWN_BELOW
@click.option("--fps", type=float, help="Frame rate of a video file or image folder (default: the video's, else 15).")
@click.option("--max-images", type=int, default=100, show_default=True,
              help="Images (or camera frames) one enrollment may take.")
@click.option("--max-upload-mb", type=int, default=64, show_default=True, help="Largest request body.")
@_BACKEND
@_STORE
def serve(engine_dir, source, host, port, token, top_k, accept_rate, unknown_below, fps, max_images, max_upload_mb,
          backend, store):
    """The board's web page and HTTP API: live view, enroll, rename/remove, history, rollback.

    Runs the camera loop and serves http://HOST:PORT/ (docs/SERVE.md). Loopback only unless
    --host says otherwise, and then every state-changing call needs the token."""
    require_all(SERVE, "edgecl serve")
    from .device.runtime import Runtime
    from .device.serve import serve as run_server
    from .device.sources import open_source, parse_source

    at_least("--top-k", top_k, 1)
    at_least("--max-images", max_images, 1)
    at_least("--max-upload-mb", max_upload_mb, 1)
    at_least("--port", port, 0)
    if port > 65535:
        raise EdgeclError(f"--port {port}: must be 65535 or less")
    if fps is not None and not 0.1 <= fps <= 240:
        raise EdgeclError(f"--fps {fps}: must be from 0.1 to 240")
    parse_source(source)  # a bad --source fails before the engine loads
    rt = Runtime(engine_dir, backend, store=store, accept_rate=accept_rate, unknown_below=unknown_below,
                 log=click.echo)
    click.echo(rt.open_set_line())

    def reopen():
        return open_source(source, size=rt.size, log=click.echo)

    run_server(rt, reopen(), reopen, host=host, port=port, token=token, k=top_k, fps=fps, max_images=max_images,
               max_upload_mb=max_upload_mb, log=click.echo)


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--frames", type=int, default=200, show_default=True, help="Timed frames.")
@click.option("--frame-size", default="640x480", show_default=True, metavar="WxH",
              help="Camera frame size to resize from.")
@click.option("--enroll-classes", type=int, default=5, show_default=True)
@click.option("--enroll-frames", type=int, default=20, show_default=True)
@_BACKEND
def bench(engine_dir, as_json, frames, frame_size, enroll_classes, enroll_frames, backend):
    """Engine latency, host overhead, FPS, enrollment time, store size."""
    require_all(DEVICE, "edgecl bench")
    from .device.bench import run_bench

    try:
        w, h = (int(v) for v in frame_size.lower().split("x"))
    except ValueError:
        w = h = None
    if w is None or w < 2 or h < 2:
        raise EdgeclError(f"--frame-size {frame_size!r}: expected WxH of at least 2x2, e.g. 640x480")
    at_least("--frames", frames, 1)
    at_least("--enroll-classes", enroll_classes, 0)
    at_least("--enroll-frames", enroll_frames, 1)
    result = run_bench(engine_dir, backend, frames=frames, frame_size=(h, w), enroll_classes=enroll_classes,
                       enroll_frames=enroll_frames, log=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for k, v in result.items():
            click.echo(f"{k}: {v}")


@cli.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The merged store (may be one of STORES).")
@click.option("--engine-dir", type=click.Path(), help="Solve the merged heads now (else at first use).")
def merge(stores, out, engine_dir):
    """Sum the class statistics of several devices' stores (same engine) exactly."""
    from .core.formats import check_output_path
    from .device.store import merge_stores

    check_output_path(out, "--out", store_ok=True, parent_must_exist=False)
    merged, gen = merge_stores(list(stores), out, log=click.echo)
    click.echo(f"merged {len(stores)} stores into {out} generation {gen}: {len(merged.classes)} classes, "
               f"{len(merged.row_uid)} enrolled rows")
    if engine_dir:
        require_all(ENGINE, "edgecl merge --engine-dir")
        from .device.enroll import solve_store

        click.echo(f"solved the heads: generation {solve_store(engine_dir, out, log=click.echo)}")


@cli.command()
@click.option("--out", default="edgecl-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's data, bundle, engine directory and device store (relative to the "
                   "current directory).")
@click.option("--method", default="ranpac", show_default=True, help="simplecil or ranpac.")
@click.option("--no-progress", is_flag=True)
def demo(out, method, no_progress):
    """The main job on the embedded default: no download, a few minutes on a CPU.

    scikit-learn's handwritten digits (shipped inside scikit-learn) are learned in five
    class-incremental sessions of two digits on the embedded EfficientNet-Lite0; per-session
    accuracy and the bundle path are printed. The bundle is then exported to an engine
    directory that the torch-free device runtime runs and enrolls the tenth digit into.
    """
    require_all(DEMO, "edgecl demo")
    from .demo import run_demo

    run_demo(out, method=method, progress=not no_progress, log=click.echo)


def at_least(option: str, value, low: int) -> None:
    """Refuse an integer option below ``low`` (None: not given) with one line."""
    if value is not None and value < low:
        raise EdgeclError(f"{option} {value}: must be {low} or more")


def main(argv=None) -> None:
    cli.main(args=argv, prog_name="edgecl")


if __name__ == "__main__":
    main(sys.argv[1:])
