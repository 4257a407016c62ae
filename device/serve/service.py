"""What ``edgecl serve`` does, apart from HTTP: the reads (status, classes, history, the store
archive) and the changes (enroll from the camera or from images, rename, remove, rollback, merge
an uploaded store), each change all-or-nothing.

Every change runs under :attr:`Service.ops` (one change at a time in this process: two
enrollments asked for together are serialised, each takes its own frames, both are committed) and
then under the camera's lock (:attr:`Camera.lock <edgecl.device.serve.camera.Camera.lock>`: the
runtime is not thread-safe) while it updates the heads and commits a new store generation; the
store's file lock serialises writers across processes. If another process committed since this
one loaded, the store is reloaded first and the change applied to the newest generation (a
commit refused as stale is retried the same way), so nothing committed anywhere is lost. A change
that fails leaves nothing: the heads go back to the store's newest generation.

Errors are :class:`ApiError` (an HTTP status and one line); any other
:class:`~edgecl.core.errors.EdgeclError` is bad input (400).
"""

from __future__ import annotations

import base64
import io
import re
import tarfile
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import numpy as np

from edgecl.core.errors import EdgeclError, one_line
from edgecl.core.labels import check_label, shown

from ..enroll import usable_frames
from ..sources import read_file_frame
from ..store import (
    ClassStore,
    GenerationGone,
    NoGeneration,
    StoreChanged,
    merge_states,
    same_content,
    store_record,
)

MAX_IMAGES = 100  # images (or live frames) one enrollment takes at most
MAX_UPLOAD_MB = 64  # one request's body at most
PREVIEW = 12  # frames shown back after an enrollment
_STORE_FILE = re.compile(r"^gen-\d{8}\.(json|safetensors)$")


class ApiError(Exception):
    """An error the API answers with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class NamedUpload(io.BytesIO):
    """An uploaded file's bytes for the one decode path; its name is what messages show."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = f"upload {shown(name)!r}"

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


def data_uri(frame: np.ndarray) -> str:
    from .camera import encode_jpeg

    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(frame, 85)).decode()


class Service:
    """The operations of ``edgecl serve`` on a runtime and its camera (module docstring)."""

    def __init__(self, rt, camera, max_images: int = MAX_IMAGES, max_upload_bytes: int = MAX_UPLOAD_MB << 20,
                 token_required: bool = False, log: Callable = print):
        self.rt, self.camera, self.log = rt, camera, log
        self.max_images, self.max_upload_bytes, self.token_required = max_images, max_upload_bytes, token_required
        self.ops = threading.Lock()  # one change at a time
        self._checked = 0.0
        self._engine_counts = self._read_engine_counts()

    @property
    def heads(self):
        return self.rt.heads

    # ----------------------------------------------------------------- reads
    def _read_engine_counts(self) -> Optional[list]:
        """Training samples per engine class when the export recorded them (``<learner>.ranpac.counts``)."""
        try:
            from safetensors import safe_open

            f = self.rt.engine_dir / "stats.safetensors"
            if not f.is_file():
                return None
            with safe_open(str(f), "numpy") as st:
                key = next((k for k in st.keys() if k.endswith(".counts")), None)
                return None if key is None else [int(round(float(c))) for c in st.get_tensor(key)]
        except Exception:  # noqa: BLE001 - only a nicety of the class list
            return None

    def refresh(self) -> None:
        """Serve the store's newest generation when another process committed (checked at most once a second)."""
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        if not self.ops.acquire(blocking=False):
            return  # a change is running: it reloads first anyway
        try:
            if self.heads.store.changed():
                with self.camera.lock:
                    self.heads.reload()
                self.log(f"store {self.heads.store.path}: another process committed; serving generation "
                         f"{self.heads.state.generation}")
        finally:
            self.ops.release()

    def classes(self) -> list:
        with self.camera.lock:
            st = self.heads.state
            counts = st.counts()
            out = []
            for c in st.classes:
                if c.uid is not None:
                    out.append({"name": c.name, "kind": "enrolled", "samples": counts.get(c.uid, 0)})
                else:
                    n = self._engine_counts[c.base] if self._engine_counts and c.base < len(self._engine_counts) \
                        else None
                    out.append({"name": c.name, "kind": "engine", "samples": n})
        return out

    def status(self) -> dict:
        self.refresh()
        rt, m = self.rt, self.rt.manifest
        classes = self.classes()
        ident = m.identity()
        return {
            "engine": {"dir": str(rt.engine_dir), "method": m.method, "learners": dict(self.heads.learners),
                       "input_size": rt.size, "backend": getattr(rt.backend, "name", None),
                       "aggregation": None if m.aggregation is None else m.aggregation.kind,
                       "model_sha256": ident.model_sha256, "heads_sha256": ident.heads_sha256,
                       "stats_sha256": ident.stats_sha256},
            "store": {"path": str(self.heads.store.path), "generation": self.heads.state.generation,
                      "classes": len(classes), "enrolled": sum(c["kind"] == "enrolled" for c in classes)},
            "classes": classes,
            "camera": self.camera.status(),
            "auth": {"token_required": self.token_required},
            "limits": {"max_images": self.max_images, "max_upload_bytes": self.max_upload_bytes},
            "process": {"cpu_s": round(time.process_time(), 4), "time": time.time()},
        }

    def history(self, limit: Optional[int] = None) -> dict:
        if limit is not None and limit < 1:
            raise ApiError(400, f"limit {limit}: must be 1 or more")
        return {"current": self.heads.state.generation, "generations": self.heads.history(limit)}

    def store_archive(self) -> tuple:
        """(file name, tar bytes) of the store's newest generation: its two files in a folder, what
        ``edgecl merge`` reads."""
        with self.ops:
            store = self.heads.store
            gens = store.generations()
            if not gens:
                raise ApiError(404, "the store has no generation yet (nothing enrolled, renamed or removed); "
                                    "nothing to download")
            record = store_record(store.path)
            folder = f"edgecl-store-{record.generation}"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name in (record.file, f"gen-{record.generation:08d}.json"):
                    data = (store.path / name).read_bytes()
                    info = tarfile.TarInfo(f"{folder}/{name}")
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                    tar.addfile(info, io.BytesIO(data))
        return f"{folder}.tar", buf.getvalue()

    # ----------------------------------------------------------------- changes
    def _change(self, apply: Callable, prepared: bool = False) -> tuple:
        """``apply(heads)`` then commit, all-or-nothing (module docstring); returns (apply's result,
        the new generation). The caller holds :attr:`ops` when ``prepared``."""
        if not prepared:
            with self.ops:
                return self._change(apply, prepared=True)
        for _ in range(3):
            with self.camera.lock:
                heads = self.heads
                if heads.store.changed():
                    heads.reload()
                try:
                    result = apply(heads)
                    gen = heads.commit()
                    if heads.store.needs_compaction():  # off the request's path (module docstring of the store)
                        threading.Thread(target=heads.store.compact, name="edgecl-compact", daemon=True).start()
                    return result, gen
                except StoreChanged:
                    heads.reload()
                    continue
                except BaseException:
                    heads.reload()
                    raise
        raise ApiError(409, f"store {self.heads.store.path} kept changing under other writers; try again")

    def _check_new_name(self, name, what: str) -> str:
        name = check_label(name, what)
        j = self.heads.state.index(name)
        if j >= 0 and self.heads.state.classes[j].base is not None:
            raise ApiError(409, f"{what}: {name!r} is a class of the engine; enroll under another name (or rename "
                                f"that class first)")
        return name

    def _enroll(self, name: str, frames: np.ndarray, what: str) -> dict:
        def apply(heads):
            return self.rt.enroll_frames(name, frames)

        info, gen = self._change(apply, prepared=True)
        step = max(1, len(frames) // PREVIEW)
        self.log(f"enrolled {name!r} from {len(frames)} {what} (generation {gen})")
        return {"name": name, "generation": gen, "frames": int(info["frames"]), "rows": int(info["rows"]),
                "classes": int(info["classes"]), "update_ms": round(info["update_ms"], 2),
                "features_ms": round(info["features_ms"], 2),
                "preview": [data_uri(f) for f in frames[::step][:PREVIEW]]}

    def enroll_live(self, name, frames) -> dict:
        """Enroll class ``name`` from the camera's next ``frames`` frames (blank ones dropped)."""
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= self.max_images:
            raise ApiError(400, f"frames {frames!r}: must be an integer from 1 to {self.max_images}")
        name = self._check_new_name(name, "name")
        self.heads.check_enrollable()
        with self.ops:
            fps = self.camera.fps or 5.0
            timeout = min(300.0, 10.0 + 3.0 * frames / max(fps, 0.5))
            got = self.camera.grab(name, frames, timeout)
            if len(got) < frames:
                state, message = self.camera.camera_state()
                raise ApiError(503, f"the camera gave {len(got)} of {frames} frames in {timeout:.0f} s "
                                    f"({state}{': ' + message if message else ''}); nothing enrolled")
            return self._enroll(name, usable_frames(got, "the camera"), "camera frames")

    def enroll_images(self, name, files: list) -> dict:
        """Enroll class ``name`` from uploaded images ([(file name, bytes)]), through the one decode
        path at the model's size (as ``edgecl enroll --images``); any file that does not decode
        refuses the whole request, naming it."""
        if not files:
            raise ApiError(400, "no images: send one or more files in the form field 'images'")
        if len(files) > self.max_images:
            raise ApiError(413, f"{len(files)} images: at most {self.max_images} per enrollment")
        name = self._check_new_name(name, "name")
        self.heads.check_enrollable()
        frames = []
        for fname, data in files:
            try:
                frames.append(read_file_frame(NamedUpload(data, fname or "image"), self.rt.size))
            except EdgeclError as exc:
                raise ApiError(400, str(exc).replace("; delete or replace it", "; send another image")) from None
        frames = usable_frames(frames, f"{len(files)} uploaded image(s)")
        with self.ops:
            return self._enroll(name, frames, "uploaded images")

    def rename(self, old, new) -> dict:
        if not isinstance(old, str) or self.heads.state.index(old) < 0:
            raise ApiError(404, f"rename: no class {shown(old)!r}")
        new = check_label(new, "new")
        if self.heads.state.index(new) >= 0:
            raise ApiError(409, f"rename: {new!r} is already a class")
        _, gen = self._change(lambda heads: heads.rename(old, new))
        return {"old": old, "new": new, "generation": gen}

    def remove(self, name) -> dict:
        if not isinstance(name, str) or self.heads.state.index(name) < 0:
            raise ApiError(404, f"remove: no class {shown(name)!r}")
        _, gen = self._change(lambda heads: heads.remove(name))
        return {"removed": name, "generation": gen}

    def rollback(self, to) -> dict:
        if isinstance(to, bool) or not isinstance(to, int):
            raise ApiError(400, f"to {to!r}: must be a generation number (GET /api/history lists them)")

        def apply(heads):
            if to == heads.state.generation:
                raise ApiError(409, f"rollback: generation {to} is the current one; nothing to roll back")
            try:
                heads.rollback(to, commit=False)
            except NoGeneration as exc:
                raise ApiError(404, f"rollback: {exc}") from None
            except GenerationGone as exc:
                raise ApiError(410, f"rollback: {exc}") from None

        _, gen = self._change(apply)
        self.log(f"rolled back to generation {to} (committed as generation {gen})")
        return {"to": to, "generation": gen, "classes": len(self.heads.classes)}

    def merge_archive(self, data: bytes, label: str = "upload") -> dict:
        """Merge a store uploaded as a tar (what :meth:`store_archive` gives, or any tar of a store
        folder's ``gen-*`` files) into this one, as ``edgecl merge`` does; commits the union."""
        files = read_store_tar(data)
        with tempfile.TemporaryDirectory(prefix="edgecl-upload-") as tmp:
            for name, content in files.items():
                (Path(tmp) / name).write_bytes(content)
            try:
                record = store_record(tmp)
                other = ClassStore(tmp, record.engine, log=lambda m: None).load()
            except EdgeclError as exc:
                raise ApiError(400, f"the uploaded store cannot be read: {str(exc).replace(tmp, 'the upload')}") \
                    from None
            if other is None:
                raise ApiError(400, "the uploaded store holds no readable generation")
        report_lines: list = []

        def apply(heads):
            merged, report = merge_states([heads.state, other], [str(heads.store.path), label])
            report_lines[:] = report.lines()
            if same_content(heads.state, merged):
                raise _Unchanged()
            merged.history = list(heads.state.history) + merged.history
            heads.use_state(merged)

        try:
            _, gen = self._change(apply)
        except _Unchanged:
            return {"generation": self.heads.state.generation, "changed": False, "report": report_lines}
        for line in report_lines:
            self.log(line)
        return {"generation": gen, "changed": True, "report": report_lines, "classes": len(self.heads.classes)}


class _Unchanged(Exception):
    """The merge holds nothing new: nothing to commit."""


def read_store_tar(data: bytes) -> dict:
    """{``gen-NNNNNNNN.json|safetensors``: bytes} from a tar (plain or compressed) of a store
    folder: the ``gen-*`` files of the shallowest folder that has some (a store's ``history/`` and
    set-aside folders are below it); other members are ignored, and no member's name chooses a
    path."""
    found: dict = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for i, member in enumerate(tar):
                if i >= 10000:
                    raise ApiError(400, "the uploaded tar has more than 10000 members; send one store folder")
                path = PurePosixPath(member.name)
                if not member.isfile() or not _STORE_FILE.match(path.name):
                    continue
                f = tar.extractfile(member)
                found.setdefault(path.parent.as_posix(), {})[path.name] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ApiError(400, f"the upload is not a tar of a store folder ({one_line(exc)}); send what GET "
                            f"/api/store gives, or tar -cf store.tar STORE_DIR") from None
    folders = [d for d, files in found.items() if any(n.endswith(".json") for n in files)]
    if not folders:
        raise ApiError(400, "the uploaded tar holds no store generation (gen-NNNNNNNN.json and .safetensors)")
    depth = min(len(PurePosixPath(d).parts) for d in folders)
    top = [d for d in folders if len(PurePosixPath(d).parts) == depth]
    if len(top) > 1:
        raise ApiError(400, f"the uploaded tar holds several stores ({', '.join(sorted(top)[:3])}); send one")
    return found[top[0]]
