"""The artifacts handed between stages, as typed records (docs/DESIGN.md, "Artifact formats").

- :class:`BundleManifest`: ``BUNDLE/manifest.json``, written by ``edgecl train``
  (:mod:`edgecl.bundle`), read by ``edgecl eval`` and ``edgecl export``;
- :class:`EngineManifest`: ``ENGINE_DIR/manifest.json``, written by ``edgecl export``, read by
  the device (:mod:`edgecl.device.engine_dir`);
- :class:`StoreRecord` and :class:`StoreMeta`: a store generation's commit record and the state
  metadata inside its safetensors file (:mod:`edgecl.device.store`).

Each record carries its format name and version; reading one checks both, and every key's
type, with a one-line error naming the file, the key and what re-creates the artifact
(:mod:`edgecl.core.records`). Tensor names follow one scheme, ``[<learner>.]<kind>.<name>``
(:func:`pack`, :func:`unpack`): the learner prefix in multi-learner bundles (SAFE: ``slow``,
``fast``) and always in engine directories, then the head kind (``ranpac``, ``prototypes``,
``linear``...), then the tensor's own name (``W``, ``G``...). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import EdgeclError, one_line
from .records import from_dict, to_dict

BUNDLE_FIX = "re-run edgecl train"
SINGLE = "main"  # the learner name of single-learner methods


def engine_fix(path) -> str:
    return f"re-create it with edgecl export BUNDLE --out {path}"


# ----------------------------------------------------------------------------- tensor names

def tensor_key(kind: str, name: str, learner: Optional[str] = None) -> str:
    """``[<learner>.]<kind>.<name>``."""
    return f"{learner}.{kind}.{name}" if learner else f"{kind}.{name}"


def pack(tensors: dict, kind: str, learner: Optional[str] = None) -> dict:
    """``{name: t}`` -> ``{[<learner>.]<kind>.<name>: t}``."""
    return {tensor_key(kind, k, learner): v for k, v in tensors.items()}


def unpack(group: dict, kind: str, learner: Optional[str] = None) -> dict:
    """The inverse of :func:`pack`: the tensors of ``group`` under that prefix, prefix removed."""
    prefix = tensor_key(kind, "", learner)
    return {k[len(prefix):]: v for k, v in group.items() if k.startswith(prefix)}


def load_tensor_file(load, path, what: str, fix: str) -> dict:
    """``load(path)`` (safetensors' numpy or torch ``load_file``), a file that does not parse (a
    truncated file whose hash was updated, say) refused with one line naming ``what`` and ``fix``."""
    try:
        return load(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors' errors, shown as one line
        raise EdgeclError(f"{what}: {Path(path).name} cannot be read as safetensors ({one_line(exc)}); "
                          f"{fix}") from None


def split_learner(group: dict, learners: list) -> dict:
    """``{learner: {rest: t}}`` from keys ``<learner>.<rest>`` (keys of other learners ignored)."""
    out: dict = {ln: {} for ln in learners}
    for key, value in group.items():
        learner, _, rest = key.partition(".")
        if learner in out:
            out[learner][rest] = value
    return out


# ----------------------------------------------------------------------------- shared parts

@dataclass
class InputSpec:
    """The model input: uint8 NHWC frames of ``size`` x ``size`` in ``channel_order``,
    normalised by ``mean`` / ``std`` (in the graph for engine directories)."""

    size: int
    mean: List[float]
    std: List[float]
    channel_order: str = "RGB"
    layout: str = "NHWC"
    dtype: str = "uint8"
    name: Optional[str] = None  # the engine graph's input tensor
    preprocessing: Optional[str] = None


@dataclass
class BackboneInfo:
    name: str
    weights_sha256: str
    feature_dim: int
    weights: str = "default"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassList:
    names: List[str]  # incremental order (= logit order)
    sessions: List[List[str]] = field(default_factory=list)


@dataclass
class LearnerFacts:
    """What a learner tells the exporter and the device (``Learner.meta()``): its head kind,
    the names of its learners (SAFE: slow and fast), and method facts kept in ``extra``
    (RanPAC M / seed / lambda, SLCA's class-statistics form, training history...)."""

    head: str
    learners: List[str] = field(default_factory=lambda: [SINGLE])
    num_seen: int = 0
    feature_dim: Optional[int] = None
    gamma: float = 1.0  # SAFE's aggregation sharpness
    inference: str = "aggregate"  # SAFE: what the method predicts (aggregate, slow or fast)
    temperatures: Dict[str, float] = field(default_factory=dict)  # SAFE: each learner's logit temperature
    extra: Dict[str, Any] = field(default_factory=dict)


SELF_HASH = "manifest_sha256"


def content_sha256(data: dict) -> str:
    """sha256 of a manifest's content (canonical JSON of every key but its own hash)."""
    body = {k: v for k, v in data.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_header(data: Any, fmt: str, versions: tuple, path: Path, what: str, fix: str) -> None:
    mf = path / "manifest.json"
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EdgeclError(f"{mf} is not an edgecl {what} manifest (format {got!r}); {fix}")
    if data.get("format_version") not in versions:
        raise EdgeclError(f"{what} {path} has format version {data.get('format_version')!r}; this edgecl reads "
                          f"version {' or '.join(map(str, versions))}: {fix} with this edgecl")
    if data["format_version"] >= 2 and data.get(SELF_HASH) != content_sha256(data):
        raise EdgeclError(f"{mf} does not match its own hash ({SELF_HASH}): the manifest was edited or damaged; "
                          f"{fix}")


def read_json_manifest(path, what: str, fix: str) -> Any:
    """The parsed ``path/manifest.json`` of a ``what`` directory, refused with one line when the
    directory, the file or its JSON is missing or broken."""
    path = Path(path)
    if not path.exists():
        raise EdgeclError(f"{what} {path} does not exist; {fix}")
    mf = path / "manifest.json"
    if not mf.is_file():
        raise EdgeclError(f"{path} is not an edgecl {what}: manifest.json is missing; {fix}")
    try:
        return json.loads(mf.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeclError(f"{mf} cannot be read as JSON ({one_line(exc)}); the {what}'s manifest "
                          f"is damaged: {fix}") from None


def manifest_format(path) -> Optional[str]:
    """The ``format`` a directory's manifest declares (None when there is none to read)."""
    try:
        data = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def artifact_format(path) -> Optional[str]:
    """The format of the artifact directory at ``path``: its manifest's ``format``, or, when the
    manifest is too damaged to say, the one its files point to (an engine directory has
    ``classes.json`` and ONNX models, a bundle ``backbone.safetensors``); None for neither."""
    fmt = manifest_format(path)
    if fmt is not None or not (Path(path) / "manifest.json").exists():
        return fmt
    if (Path(path) / "classes.json").is_file() or any(Path(path).glob("model.*.onnx")):
        return EngineManifest.FORMAT
    if (Path(path) / "backbone.safetensors").is_file():
        return BundleManifest.FORMAT
    return None


def enclosing(path, fmt: str) -> Optional[Path]:
    """The directory of format ``fmt`` (e.g. ``edgecl-engine``) that is ``path`` or holds it, if any."""
    p = Path(path).expanduser().resolve()
    for d in (p, *p.parents):
        if manifest_format(d) == fmt:
            return d
    return None


def check_output_path(path, option: str, store_ok: bool = False, parent_must_exist: bool = True) -> None:
    """Refuse to write ``path`` (given with ``option``) inside an engine directory, whose files its
    manifest binds; ``store_ok``: the engine's own ``store/`` folder is fine. ``parent_must_exist``:
    the folder to write into must exist (a file option), with one line saying so."""
    p = Path(path).expanduser().resolve()
    eng = enclosing(p, EngineManifest.FORMAT)
    if eng is not None and not (store_ok and p == eng / "store"):
        where = "its store belongs in ENGINE_DIR/store" if store_ok else "write it elsewhere"
        raise EdgeclError(f"{option} {path} is inside the engine directory {eng}, whose files its manifest binds: "
                          f"{where}")
    if parent_must_exist and not p.parent.is_dir():
        raise EdgeclError(f"{option} {path}: the folder {p.parent} does not exist; create it or choose another path")


class _Manifest:
    """A manifest: its format name and version checked on reading; from version 2 it carries
    :data:`SELF_HASH`, the sha256 of its own content, so an edited manifest (reversed class names,
    another input size...) is refused like an edited file (version 1, unhashed, is still read)."""

    FORMAT = ""
    VERSION = 2
    READS = (1, 2)
    WHAT = ""

    @classmethod
    def fix(cls, path) -> str:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: Any, path) -> Any:
        path = Path(path)
        _check_header(data, cls.FORMAT, cls.READS, path, cls.WHAT, cls.fix(path))
        body = {k: v for k, v in data.items() if k not in ("format", "format_version", SELF_HASH)}
        return from_dict(cls, body, str(path / "manifest.json"), f"the {cls.WHAT} is damaged: {cls.fix(path)}")

    @classmethod
    def read(cls, path) -> Any:
        """Read and check ``path/manifest.json``."""
        return cls.from_json(read_json_manifest(path, cls.WHAT, cls.fix(path)), path)

    def to_json(self) -> dict:
        data = {"format": self.FORMAT, "format_version": self.VERSION, **to_dict(self)}
        return {**data, SELF_HASH: content_sha256(data)}


# ----------------------------------------------------------------------------- the run bundle

@dataclass
class BundleManifest(_Manifest):
    """``BUNDLE/manifest.json`` (format ``edgecl-bundle``, version 2); ``files`` binds every file
    of the bundle by sha256, ``manifest_sha256`` the manifest itself."""

    FORMAT = "edgecl-bundle"
    WHAT = "bundle"

    method: str
    backbone: BackboneInfo
    input: InputSpec
    classes: ClassList
    learner: LearnerFacts
    config: Dict[str, Any]
    files: Dict[str, str] = field(default_factory=dict)
    pet: Optional[Dict[str, Any]] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    edgecl_version: str = ""
    created: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fix(cls, path) -> str:
        return BUNDLE_FIX

    @property
    def data_config(self) -> dict:
        """The resolved ``data`` section of the run's configuration (where its images were)."""
        return dict(self.config.get("data") or {})

    def head_kinds(self) -> dict:
        """``{learner: head kind}``."""
        return {ln: self.learner.head for ln in self.learner.learners}


# ----------------------------------------------------------------------------- the engine directory

@dataclass(frozen=True)
class AlignmentSpec:
    """SLCA's classifier alignment (Sec. 4.2) as one head was trained with it: the bundle's
    ``slca.ca_*``, ``tau``, ``logit_norm``, ``ca_mean_scale``, ``fc_scale_mu``, ``train.momentum``,
    ``train.weight_decay`` and seed. Run by training (torch) and, after an enrollment, by the
    device (:mod:`edgecl.core.alignment`, numpy)."""

    epochs: int = 5
    samples_per_class: int = 256
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    tau: float = 0.1
    logit_norm: str = "session"
    mean_scale: bool = False
    fc_scale_mu: float = 0.0
    seed: int = 1993

    def lr_at(self, epoch: int) -> float:
        """The cosine-decayed learning rate of ``epoch`` (0-based): lr (1 + cos(pi e / E)) / 2."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, self.epochs)))


@dataclass
class LearnerOutput:
    """One learner of an engine directory: its graph output and its head's kind; an SLCA-family
    linear head also the alignment it was trained with (what the device re-runs to enroll)."""

    output: str
    head: str
    feature_dim: Optional[int] = None
    alignment: Optional[AlignmentSpec] = None


@dataclass
class Aggregation:
    """SAFE's entropy-weighted aggregation of the learners, and what the engine predicts
    (``aggregate``, or one learner alone as the bundle's ``safe.inference`` said)."""

    kind: str = "entropy"
    gamma: float = 1.0
    predict: str = "aggregate"
    # per learner: its logits are divided by this before the entropy and the mix (absent: 1)
    temperatures: Dict[str, float] = field(default_factory=dict)


@dataclass
class OpenSetCalibration:
    """Unknown rejection and confidence (edgecl.device.openset), fitted by ``edgecl export`` on
    held-out training images of the engine's classes: the rejection ``score``, the default
    ``accept_rate`` of known images, the ``temperature`` and the confidence map ``platt`` (a, b);
    ``file`` keeps those images' features and classes (the device recomputes the threshold from
    them after every change of its classes); ``images`` of them, from ``source``; ``threshold``
    and ``ece`` as fitted (the engine's own classes)."""

    score: str
    accept_rate: float
    temperature: float
    platt: List[float]
    file: str = "openset.safetensors"
    images: int = 0
    source: str = ""
    threshold: Optional[float] = None
    ece: Dict[str, float] = field(default_factory=dict)


@dataclass
class ClassesRef:
    file: str = "classes.json"
    count: int = 0


@dataclass
class ModelEntry:
    file: str
    runtime: str = "onnxruntime"
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EnginePlan:
    """A TensorRT plan in the directory: its file, precision, TensorRT version, device and the
    ONNX it was built from."""

    file: str
    precision: str
    onnx: str = "model.fp32.onnx"
    tensorrt: Optional[str] = None
    device: Optional[str] = None
    onnx_sha256: Optional[str] = None
    batch_range: List[int] = field(default_factory=lambda: [1, 8, 32])
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceBundle:
    path: str = ""
    manifest_sha256: str = ""
    A_last: Optional[float] = None
    val_per_class: Optional[int] = None


@dataclass
class EngineManifest(_Manifest):
    """``ENGINE_DIR/manifest.json`` (format ``edgecl-engine``, version 2); ``files`` binds the
    graph, heads, statistics, classes and parity report by sha256, ``manifest_sha256`` the
    manifest itself."""

    FORMAT = "edgecl-engine"
    WHAT = "engine directory"

    input: InputSpec
    learners: Dict[str, LearnerOutput]
    classes: ClassesRef
    models: Dict[str, ModelEntry]
    files: Dict[str, str]
    method: Optional[str] = None
    backbone: Optional[Dict[str, Any]] = None
    source_bundle: SourceBundle = field(default_factory=SourceBundle)
    aggregation: Optional[Aggregation] = None
    open_set: Optional[OpenSetCalibration] = None
    precision: str = "fp32"
    opset: Optional[int] = None
    batch_range: List[int] = field(default_factory=lambda: [1, 8, 32])
    engines: List[EnginePlan] = field(default_factory=list)
    parity: Dict[str, Any] = field(default_factory=dict)
    edgecl_version: str = ""
    created: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fix(cls, path) -> str:
        return engine_fix(path)

    def head_kinds(self) -> dict:
        return {ln: info.head for ln, info in self.learners.items()}

    def default_precision(self) -> str:
        """The model an engine directory runs by default: the precision it was exported for, or
        fp32 when that has no ONNX model of its own (an fp16 TensorRT export runs its fp32 ONNX
        outside TensorRT)."""
        return self.precision if self.precision in self.models else "fp32"

    def model_file(self, precision: Optional[str] = None) -> str:
        """The ONNX file of ``precision`` (default :meth:`default_precision`); an explicit
        precision the directory lacks is refused."""
        precision = precision or self.default_precision()
        if precision not in self.models:
            raise EdgeclError(f"the engine directory has no {precision} ONNX model (it has: "
                              f"{', '.join(self.models)}); export with --precision {precision}")
        return self.models[precision].file

    def identity(self) -> "EngineIdentity":
        """The hashes that make a store valid for this engine: model, heads, statistics."""
        model = self.models["fp32"].file if "fp32" in self.models else "model.fp32.onnx"
        return EngineIdentity(self.files.get(model), self.files.get("heads.safetensors"),
                              self.files.get("stats.safetensors"))


# ----------------------------------------------------------------------------- the store

STORE_FORMAT = "edgecl-store"
STORE_VERSION = 1


@dataclass
class EngineIdentity:
    model_sha256: Optional[str] = None
    heads_sha256: Optional[str] = None
    stats_sha256: Optional[str] = None


@dataclass
class StoreRecord:
    """``gen-NNNNNNNN.json``, the commit record of a store generation (written last: the commit
    point): the data file, its size and sha256, the engine it belongs to."""

    generation: int
    file: str
    bytes: int
    sha256: str
    engine: EngineIdentity
    classes: int = 0
    created: str = ""
    format: str = STORE_FORMAT
    format_version: int = STORE_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path) -> "StoreRecord":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EdgeclError(f"{path} cannot be read as JSON ({one_line(exc)})") from None
        rec = from_dict(cls, data, str(path), "the store generation is damaged")
        if rec.format != STORE_FORMAT or rec.format_version != STORE_VERSION:
            raise EdgeclError(f"{path} is not an {STORE_FORMAT} v{STORE_VERSION} commit record")
        return rec

    def to_json(self) -> dict:
        return to_dict(self)


@dataclass
class ClassEntry:
    """One class of a store generation, in logit order: an engine class (``base``: its index in
    classes.json) or an enrolled one (``uid``)."""

    name: str
    base: Optional[int] = None
    uid: Optional[int] = None


@dataclass
class Contribution:
    """The rows one enrollment (one ``ClassHeads.enroll`` call) added to a store: ``id``, its
    stable identity (32 hex digits: random when enrolled; for a store written before ids, derived
    from sha256 of the class name and the rows' bytes), ``uid`` of the enrolled class it belongs
    to, its number of ``rows`` (the state's ``row_contrib`` tensor gives each row's contribution)
    and when it was enrolled (``time``, seconds since the epoch; None when unknown). ``edgecl
    merge`` takes the union of the stores' contributions by id."""

    id: str
    uid: int
    rows: int
    time: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreMeta:
    """The metadata of a store generation's state (inside its safetensors file).
    ``contributions``: the enrolled rows by enrollment (:class:`Contribution`);
    ``removed_contributions``: ids of contributions whose class was removed (a merge drops them
    from every store). Both are empty in stores written before contribution ids."""

    generation: int
    engine: EngineIdentity
    classes: List[ClassEntry]
    policy: Dict[str, float]
    removed_base: List[int] = field(default_factory=list)
    next_uid: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    contributions: List[Contribution] = field(default_factory=list)
    removed_contributions: List[str] = field(default_factory=list)
    format: str = STORE_FORMAT
    format_version: int = STORE_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, source: str) -> "StoreMeta":
        meta = from_dict(cls, data, source, "the store generation is damaged")
        if meta.format != STORE_FORMAT or meta.format_version != STORE_VERSION:
            raise EdgeclError(f"{source}: not an {STORE_FORMAT} v{STORE_VERSION} state")
        return meta

    def to_json(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------- the store's history

HISTORY_FORMAT = "edgecl-store-history"
HISTORY_VERSION = 1


@dataclass
class RowsRef:
    """Where a contribution's rows are kept: history ``file`` (``hist-NNNNNNNN.safetensors``),
    tensors ``<key>.<learner>``; ``sha256``: of the rows (:func:`edgecl.device.store.rows_sha256`)."""

    file: str
    key: str
    sha256: str


@dataclass
class HistoryEntry:
    """One generation in a store's history file (:mod:`edgecl.device.store`): ``sha256`` / ``bytes`` of its
    generation file, ``created`` (its record's time), ``state``: its metadata as in the
    generation file, ``widths``: per learner, the width of its rows, ``rows``: per contribution
    id, where its rows are kept, ``ops``: what its history adds to the previous generation's."""

    generation: int
    created: str
    sha256: str
    bytes: int
    state: StoreMeta
    widths: Dict[str, int]
    rows: Dict[str, RowsRef]
    ops: List[Dict[str, Any]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, source: str) -> "HistoryEntry":
        return from_dict(cls, data, source, "the store's history file is damaged")
