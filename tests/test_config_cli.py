import subprocess
import sys

import pytest
from helpers import invoke, methods, one_line_error

from edgecl.config import config_from_dict, parse_set, resolve_config
from edgecl.core.errors import EdgeclError

COMMANDS = ["train", "eval", "export", "enroll", "run", "bench", "demo"]


def test_help_lists_every_command_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from edgecl.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'edgecl --help imported torch'\n"
        "assert 'timm' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert f"  {cmd} " in res.stdout


def test_every_method_and_profile_resolves():
    for method in methods():  # the learner registry
        for profile in [None, "quick", "full", "demo"]:
            cfg = resolve_config(method, profile)
            assert cfg.method == method
    quick = resolve_config("ranpac", "quick")
    assert (quick.data.input_size, quick.data.train_per_class, quick.data.split) == (96, 100, "B0Inc10")
    assert quick.ranpac.M == 4096  # profiles.quick of configs/ranpac.yaml wins over the method's top level


def test_unknown_key_and_bad_value_name_the_key(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(EdgeclError, match=r"unknown config key 'train.epoch' \(from .*mine.yaml\)"):
        resolve_config("ranpac", config_file=str(f))
    f.write_text("ranpac:\n  M: lots\n")
    with pytest.raises(EdgeclError, match="'ranpac.M'.*integer"):
        resolve_config("ranpac", config_file=str(f))
    with pytest.raises(EdgeclError, match="'train.optimizer'.*one of sgd, adamw"):
        resolve_config("ranpac", overrides={"train": {"optimizer": "lion"}})
    f.write_text("train: [1, 2\n")
    with pytest.raises(EdgeclError, match="not valid YAML"):
        resolve_config("ranpac", config_file=str(f))


def test_set_overrides_and_roundtrip():
    cfg = resolve_config("ranpac", "quick", overrides=parse_set(["ranpac.M=128", "train.crop_scale=[0.8, 1.0]"]))
    assert cfg.ranpac.M == 128 and cfg.train.crop_scale == [0.8, 1.0]
    again = config_from_dict(cfg.to_dict(), "test")
    assert again == cfg
    with pytest.raises(EdgeclError, match="KEY=VALUE"):
        parse_set(["ranpac.M"])


def test_cli_errors_are_one_line(tmp_path):
    # (quiet: nothing is logged before these errors, the error line is the whole output)
    one_line_error(invoke(["train", "--method", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "b")]),
                   "unknown method 'nope'", quiet=True)
    res = invoke(["train", "--method", "ranpac", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    one_line_error(res, "missing", "--data", quiet=True)
    res = invoke(["train", "--method", "slca", "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    one_line_error(res, "no train/ sub-folder", quiet=True)  # slca is built: the data is what is wrong
    one_line_error(invoke(["export", str(tmp_path), "--out", str(tmp_path / "e")]), "not an edgecl bundle")
    one_line_error(invoke(["eval", str(tmp_path / "nobundle"), "--data", str(tmp_path)]), "does not exist")
