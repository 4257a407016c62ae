"""The ``edgecl`` command line. Imports are lazy: ``edgecl --help`` does not import torch."""

from __future__ import annotations

import json
import sys

import click

from .errors import EdgeclError


class UserError(click.ClickException):
    """An :class:`EdgeclError` shown as one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"edgecl: error: {self.message}", err=True)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeclError as exc:
            raise UserError(str(exc)) from None


def _not_built(command: str, issue: str) -> None:
    raise EdgeclError(f"'edgecl {command}' is not built yet ({issue}); today edgecl trains and evaluates bundles")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgecl")
def cli():
    """edgecl: an edge continual learner.

    Train a pretrained backbone class-incrementally (SAFE, SLCA++, RanPAC, SimpleCIL), export
    it to ONNX/TensorRT, and run it on a device that keeps enrolling new classes.
    """


@cli.command()
@click.option("--data", "data", help="ImageFolder root with train/ and val/ (or the download folder for --dataset cifar100|imagenet-r).")
@click.option("--val-data", help="A separate ImageFolder to evaluate on (then --data is the training folder).")
@click.option("--dataset", type=str, help="imagefolder (default), cifar100 or imagenet-r.")
@click.option("--method", required=True, help="simplecil, ranpac, safe, slca, slcapp or seqft.")
@click.option("--profile", help="quick (CPU, minutes) or full (GPU, the papers' settings).")
@click.option("--backbone", help="A timm model name (default tf_efficientnet_lite0, weights embedded).")
@click.option("--weights", help="Backbone weights: a state-dict file, 'random', or 'default' (embedded).")
@click.option("--pretrained", is_flag=True, help="Download the backbone's pretrained weights from the hub (online).")
@click.option("--split", help="Class-incremental split B{base}Inc{K}, e.g. B0Inc10.")
@click.option("--seed", type=int, help="Seed of the class order and of training (default 1993).")
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--device", help="auto, cpu or cuda[:N].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML file of overrides.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. --set ranpac.M=2048.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write the run bundle.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(data, val_data, dataset, method, profile, backbone, weights, pretrained, split, seed, epochs, device,
          config_file, sets, out, no_progress):
    """Train METHOD over class-incremental sessions and write a run bundle."""
    from .config import parse_set, resolve_config

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

    metrics = run_train(cfg, out, progress=not no_progress, log=click.echo)
    click.echo(f"A_last {metrics['A_last']:.2f}  A_avg {metrics['A_avg']:.2f}  "
               f"forgetting {metrics['forgetting']:.2f}  ({metrics['time_s']:.0f} s)")
    click.echo(f"bundle: {out}")


@cli.command(name="eval")
@click.argument("path", type=click.Path())
@click.option("--data", required=True, help="ImageFolder root (its SPLIT sub-folder is used when present).")
@click.option("--split", default="val", show_default=True)
@click.option("--per-class", type=int, help="First N images per class (default: as the bundle was evaluated).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(path, data, split, per_class, as_json):
    """Top-1 accuracy of a bundle (or engine directory) on an ImageFolder."""
    from .device.engine_dir import is_engine_dir

    if is_engine_dir(path):  # an engine directory: ONNX Runtime + numpy heads, as on the device
        from .export.evaluate import evaluate_engine_dir

        result = evaluate_engine_dir(path, data, split, per_class, progress=not as_json)
    else:
        from .train import evaluate

        result = evaluate(path, data, split, per_class, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"accuracy {result['accuracy']:.2f} on {result['n']} images of {result['classes']} classes")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The engine directory to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="int8: ONNX Runtime QDQ model (and TensorRT INT8 with --trt); fp16 needs --trt.")
@click.option("--calib-data", type=click.Path(), help="ImageFolder for INT8 calibration (default: the bundle's training data).")
@click.option("--calib-count", type=int, default=256, show_default=True, help="Calibration images (round-robin over classes).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--batch-range", default="1,8,32", show_default=True, metavar="MIN,OPT,MAX",
              help="TensorRT optimisation profile for the batch axis.")
@click.option("--workspace-mb", type=int, default=1024, show_default=True, help="TensorRT builder workspace.")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs the tensorrt module and a GPU).")
def export(bundle, out, precision, calib_data, calib_count, calib_method, batch_range, workspace_mb, trt):
    """Fold PET into the backbone and export ONNX / TensorRT engines to an engine directory."""
    from .export.exporter import export_bundle

    export_bundle(bundle, out, precision=precision, calib_data=calib_data, calib_count=calib_count,
                  calib_method=calib_method, trt=trt, batch_range=batch_range, workspace_mb=workspace_mb,
                  log=click.echo)


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--name", required=True)
@click.option("--images")
@click.option("--source")
@click.option("--frames", type=int)
def enroll(engine_dir, name, images, source, frames):
    """Enroll a new class on the device from images or camera frames."""
    _not_built("enroll", "issue #6, device runtime")


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--source", required=True)
@click.option("--headless", is_flag=True)
@click.option("--jsonl")
@click.option("--max-frames", type=int)
def run(engine_dir, source, headless, jsonl, max_frames):
    """The camera loop: capture, infer, aggregate, overlay."""
    _not_built("run", "issue #6, device runtime")


@cli.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def bench(engine_dir, as_json):
    """Engine latency, host overhead, FPS, enrollment time."""
    _not_built("bench", "issue #6, device runtime")


@cli.command()
@click.option("--out", default="edgecl-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's data and bundle.")
@click.option("--method", default="ranpac", show_default=True, help="simplecil or ranpac.")
@click.option("--no-progress", is_flag=True)
def demo(out, method, no_progress):
    """The main job on the embedded default: no download, a few minutes on a CPU.

    scikit-learn's handwritten digits (shipped inside scikit-learn) are learned in five
    class-incremental sessions of two digits on the embedded EfficientNet-Lite0; per-session
    accuracy and the bundle path are printed.
    """
    from .demo import run_demo

    run_demo(out, method=method, progress=not no_progress, log=click.echo)


def main(argv=None) -> None:
    cli.main(args=argv, prog_name="edgecl")


if __name__ == "__main__":
    main(sys.argv[1:])
