"""The layering rules of docs/DESIGN.md ("Layering"), checked on the source: every ``import`` of
every module, including the lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"edgecl": REPO / "edgecl", "edgecl.device": REPO / "device", "edgecl.export": REPO / "export",
         "edgecl.calibration": REPO / "calibration"}
TRAINER = ("edgecl.learners", "edgecl.train", "edgecl.pet", "edgecl.backbones", "edgecl.heads", "edgecl.losses",
           "edgecl.metrics", "edgecl.bundle", "edgecl.config", "edgecl.distributed")
EXPORTER = ("edgecl.export", "edgecl.calibration")
DEVICE = ("edgecl.device",)
APP = ("edgecl.cli", "edgecl.demo", "edgecl.__main__")
TORCH = ("torch", "torchvision", "timm")

# layer: (its modules, what it must never import, modules allowed to import torch lazily)
RULES = {
    "core": (("edgecl.core",), TRAINER + EXPORTER + DEVICE + APP + ("edgecl.data",) + TORCH, ()),
    "data": (("edgecl.data",), TRAINER + EXPORTER + DEVICE + APP, ("edgecl.data.augment", "edgecl.data.benchmarks")),
    "device": (DEVICE, TRAINER + EXPORTER + APP + TORCH, ()),
    "trainer": (TRAINER, EXPORTER + DEVICE + APP, TRAINER),
}


def modules() -> dict:
    """{dotted module name: path} of every module of the distribution."""
    out = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "edgecl" and any(name == r or name.startswith(r + ".") for r in ROOTS if r != "edgecl"):
                continue
            out[name] = path
    return out


def imports(name: str, source: str, is_package: bool) -> list:
    """``(imported module, line, at module level)`` for every import in ``source`` (those under
    ``if TYPE_CHECKING:`` excepted); relative imports resolved against ``name``."""
    tree = ast.parse(source)
    top_level = {id(n) for n in tree.body}
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}  # never executed
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, node.lineno, id(node) in top_level))
            found += [(f"{mod}.{a.name}", node.lineno, id(node) in top_level) for a in node.names]
    return found


def _under(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def violations(layer: str, sources: dict) -> list:
    """Imports that break ``layer``'s rule in ``sources`` ({module name: (source, is package)})."""
    members, forbidden, lazy_torch = RULES[layer]
    out = []
    for name, (source, is_package) in sources.items():
        if not _under(name, members):
            continue
        for mod, line, top in imports(name, source, is_package):
            if not _under(mod, forbidden):
                continue
            if _under(mod, TORCH) and not top and _under(name, lazy_torch):
                continue  # a lazy torch import inside a function, where the layer allows it
            out.append(f"{name}:{line} imports {mod}")
    return out


def repo_sources() -> dict:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in modules().items()}


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_it_may(layer):
    sources = repo_sources()
    assert any(_under(n, RULES[layer][0]) for n in sources), f"no module in layer {layer}"
    assert violations(layer, sources) == []


def test_the_check_catches_a_device_module_importing_the_trainer_or_the_exporter():
    """The rule bites: a device module that imports the trainer, the exporter or torch (at any
    depth, relative or absolute) is reported."""
    bad = {
        "edgecl.device.bad": ("from edgecl.train import load_learner\n"
                              "def f():\n    from ..export import exporter\n    import torch\n", False),
        "edgecl.device.fine": ("from edgecl.core.errors import EdgeclError\nimport numpy\n", False),
    }
    found = violations("device", bad)
    assert [v.split(" imports ")[1] for v in found] == ["edgecl.train", "edgecl.train.load_learner",
                                                          "edgecl.export", "edgecl.export.exporter", "torch"]
    trainer_bad = {"edgecl.learners.x": ("from ..device.heads import Head\n", False)}
    assert violations("trainer", trainer_bad) == ["edgecl.learners.x:1 imports edgecl.device.heads",
                                                  "edgecl.learners.x:1 imports edgecl.device.heads.Head"]
