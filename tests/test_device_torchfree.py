"""edgecl.device is torch-free: every device module imports, and the loop and enrollment run,
with torch, timm and torchvision unimportable."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import fresh_copy, labelled_frames, make_engine_dir


def test_device_runs_without_torch(engines, tmp_path):
    """Every device module imports, and the loop and enrollment run, with torch and timm unimportable."""
    eng = fresh_copy(engines["safe"], tmp_path / "eng")
    x, _ = labelled_frames(range(6), 2, seed=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2
    for i, f in enumerate(x):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
    device_dir = Path(__file__).resolve().parents[1] / "device"
    modules = sorted(".".join(p.relative_to(device_dir).with_suffix("").parts).removesuffix(".__init__")
                     for p in device_dir.rglob("*.py") if p != device_dir / "__init__.py")  # subpackages too
    code = ("import sys; sys.modules['torch'] = None; sys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
            "import importlib\n"
            f"for m in {modules!r}: importlib.import_module('edgecl.device.' + m)\n"
            "from edgecl.cli import main\n"
            f"main(['run', {str(eng)!r}, '--source', {str(folder)!r}, '--headless', '--max-frames', '5'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["frames"] == 5
    code2 = code.replace(f"main(['run', {str(eng)!r}, '--source', {str(folder)!r}, '--headless', '--max-frames', '5'])",
                         f"main(['enroll', {str(eng)!r}, '--name', 'z', '--images', {str(folder)!r}])")
    out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "committed generation 1" in out.stdout, out.stderr + out.stdout
    assert "torch" not in out.stderr
    # the SLCA path: a linear head enrolls by classifier alignment (numpy), run and enroll without torch
    lin = make_engine_dir(tmp_path / "linear", head="linear")
    code3 = code2.replace(str(eng), str(lin))
    out = subprocess.run([sys.executable, "-c", code3], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "committed generation 1" in out.stdout, out.stderr + out.stdout
    code4 = code.replace(str(eng), str(lin))
    out = subprocess.run([sys.executable, "-c", code4], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "aligning" not in out.stdout, out.stderr  # the store's solution, no re-alignment
