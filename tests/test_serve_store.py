"""The store's history for `edgecl serve` (edgecl.device.store): every committed generation is
listed with what changed, any of them can be rolled back to (a new, all-or-nothing commit), older
generations are compacted with the rows of a contribution stored once, stores written before
history load and keep their generations from then on, a move or a compaction cut short loses
nothing, and what cannot be restored is refused by name."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import class_frames, fresh_copy, runtime
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from edgecl.device.store import read_history_header


@pytest.fixture
def eng(engines, tmp_path):
    return fresh_copy(engines["main"], tmp_path / "eng")


@pytest.fixture
def compact_every_3(monkeypatch):
    import edgecl.device.store as store_mod

    monkeypatch.setattr(store_mod, "COMPACT_EVERY", 3)


def snapshot(rt) -> dict:
    """What a generation is: its classes, its contributions (id -> rows), its scores on fixed frames."""
    st = rt.heads.state
    groups = st.contribution_rows()
    probe = np.concatenate([class_frames(c, 2, seed=99) for c in range(10)])
    return {"classes": list(rt.classes), "removed": sorted(st.removed_base),
            "rows": {c.id: st.rows["main"][groups[i]].tobytes() for i, c in enumerate(st.contributions)},
            "scores": rt.classify(probe)["scores"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["classes"] == b["classes"] and a["removed"] == b["removed"] and a["rows"] == b["rows"]
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4 * max(1.0, np.abs(b["scores"]).max()))


STEPS = [("enroll", "six", 6), ("enroll", "seven", 7), ("rename", "seven", "gizmo"), ("enroll", "six", 8),
         ("remove", "class0", None), ("enroll", "eight", 8), ("remove", "six", None), ("rename", "class1", "one")]


def build_history(eng, steps=STEPS) -> tuple:
    """Generations of enrollments, renames and removals; returns (runtime, {generation: snapshot})."""
    rt = runtime(eng)
    snaps = {0: snapshot(rt)}
    for op, a, b in steps:
        if op == "enroll":
            rt.enroll_frames(a, class_frames(b, 4, seed=len(snaps)))
        elif op == "rename":
            rt.heads.rename(a, b)
        else:
            rt.heads.remove(a)
        gen = rt.heads.commit()
        snaps[gen] = snapshot(rt)
    return rt, snaps


def listing(store) -> list:
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.mark.parametrize("compacted", [False, True])
def test_every_generation_is_listed_and_any_can_be_rolled_back_to(eng, compacted, monkeypatch):
    if compacted:
        import edgecl.device.store as store_mod

        monkeypatch.setattr(store_mod, "COMPACT_EVERY", 3)
    rt, snaps = build_history(eng)
    store = eng / "store"
    assert sorted(p.name for p in store.glob("gen-*")) == [  # the root keeps the newest two, as before
        "gen-00000007.json", "gen-00000007.safetensors", "gen-00000008.json", "gen-00000008.safetensors"]
    # the older ones were moved to history/ (commits write nothing more than before) ...
    assert listing(store)[4:] == [f"history/gen-0000000{g}.{x}" for g in range(1, 7) for x in ("json",
                                                                                                 "safetensors")]
    rt = runtime(eng)  # ... and loading the store compacts them once enough wait there
    if compacted:  # one file: an entry per generation, the rows of each enrollment once
        assert listing(store)[4:] == ["history/hist-00000006.safetensors"]
        tensors = load_file(str(store / "history/hist-00000006.safetensors"))
        assert sorted(tensors) == ["r0.main", "r1.main", "r2.main", "r3.main"]  # six, seven, six again, eight
        entries = read_history_header(store / "history/hist-00000006.safetensors")
        assert [e["generation"] for e in entries] == list(range(1, 7)) and entries[2]["ops"][0]["op"] == "rename"
        assert (store / "history/hist-00000006.safetensors").stat().st_size < 40_000
    else:
        assert len(listing(store)) == 16
    hist = rt.heads.history()
    assert [h["generation"] for h in hist] == list(range(8, -1, -1))
    assert [h["ops"][0]["op"] for h in hist] == ["rename", "remove", "enroll", "remove", "enroll", "rename", "enroll",
                                                 "enroll", "engine"]
    assert [len(h["ops"]) for h in hist] == [1] * 9
    assert hist[5]["ops"][0] | {"time": 0} == {"op": "rename", "old": "seven", "new": "gizmo", "time": 0}
    assert all(h["available"] and h["created"] for h in hist[:-1]) and hist[0]["current"]
    assert hist[2]["enrolled"] == ["six", "gizmo", "eight"] and hist[2]["rows"] == 16
    # roll back to each generation, compacted ones included: exactly that state, as a new commit
    for g in (2, 0, 5, 8, 1, 3):
        new = rt.heads.rollback(g)
        assert_same(snapshot(rt), snaps[g])
        assert rt.heads.state.history[-1]["op"] == "rollback" and rt.heads.state.history[-1]["to"] == g
        assert_same(snapshot(runtime(eng)), snaps[g])  # what a fresh process loads: committed
        snaps[new] = snaps[g]
    hist = rt.heads.history()
    assert [h["ops"] and h["ops"][0].get("to") for h in hist[:6]] == [3, 1, 8, 5, 0, 2] and len(hist) == 15
    ridge = runtime(eng).heads.heads["main"].ridge()  # the W committed after a rollback solves its statistics
    np.testing.assert_allclose(ridge.W, ridge.solve_fresh(), atol=1e-4 * np.abs(ridge.W).max())


def test_missing_and_damaged_generations_are_refused_by_name(eng, compact_every_3):
    from edgecl.core.errors import EdgeclError
    from edgecl.device.store import GenerationGone, NoGeneration

    rt, snaps = build_history(eng)
    store = eng / "store"
    with pytest.raises(NoGeneration, match="no generation 9 .*0 to 8"):
        rt.heads.rollback(9)
    with pytest.raises(NoGeneration):
        rt.heads.rollback(-1)
    with pytest.raises(EdgeclError, match="current"):
        rt.heads.rollback(8)
    rt = runtime(eng)  # compacts generations 1-6
    f = store / "history/hist-00000006.safetensors"
    # damaged rows ('seven'): the generations that hold them are refused, by name
    tensors = load_file(str(f))
    tensors["r1.main"][0, 0] += 1.0
    save_file(tensors, str(f), metadata=safe_open(str(f), "numpy").metadata())
    with pytest.raises(GenerationGone, match="damaged"):
        rt.heads.rollback(2)
    with pytest.raises(GenerationGone, match="damaged"):
        rt.heads.rollback(5)
    hist = {h["generation"]: h for h in rt.heads.history()}
    assert [g for g in range(1, 9) if hist[g]["available"]] == [1, 7, 8]  # 7 and 8: their files are kept
    assert "hist-00000006" in hist[4]["reason"]
    # a lost history file: its generations are gone, said as such
    f.unlink()
    with pytest.raises(GenerationGone, match="no longer on disk"):
        rt.heads.rollback(1)
    assert [h["generation"] for h in rt.heads.history()] == [8, 7, 0]
    assert rt.heads.state.generation == 8 and runtime(eng).heads.state.generation == 8  # nothing committed


def test_a_store_written_before_history_loads_and_keeps_its_generations(eng):
    rt, snaps = build_history(eng)
    store = eng / "store"
    shutil.rmtree(store / "history")  # as an edgecl before history left it: generations 7 and 8 only
    rt = runtime(eng)
    assert_same(snapshot(rt), snaps[8])
    hist = rt.heads.history()
    assert [h["generation"] for h in hist] == [8, 7, 0] and hist[0]["ops"][0]["op"] == "rename"
    rt.enroll_frames("nine", class_frames(9, 4))
    assert rt.heads.commit() == 9  # generation 7 moves to history/
    rt.enroll_frames("ten", class_frames(10, 4))
    assert rt.heads.commit() == 10
    hist = {h["generation"]: h for h in rt.heads.history()}
    assert sorted(hist) == [0, 7, 8, 9, 10] and all(hist[g]["available"] for g in hist)
    assert hist[8]["ops"][0]["op"] == "rename" and hist[9]["ops"][0]["name"] == "nine"
    for g in (7, 8):
        rt.heads.rollback(g)
        assert_same(snapshot(rt), snaps[g])


def test_a_move_or_a_compaction_cut_short_loses_nothing(eng, compact_every_3):
    store = eng / "store"
    rt, snaps = build_history(eng, STEPS[:4])  # generations 1-4; 1 and 2 moved to history/
    # a move cut short: generation 3's record reached history/, its data did not
    (store / "gen-00000003.json").replace(store / "history/gen-00000003.json")
    hist = {h["generation"]: h for h in rt.heads.history()}
    assert not hist[3]["available"] and hist[2]["available"]
    rt.enroll_frames("nine", class_frames(9, 4))
    assert rt.heads.commit() == 5  # completes the move of 3
    assert listing(store)[4:] == [f"history/gen-0000000{g}.{x}" for g in (1, 2, 3) for x in ("json", "safetensors")]
    snaps[5] = snapshot(rt)
    # a compaction cut short: its history file written, the moved files not yet removed
    moved = {f.name: f.read_bytes() for f in (store / "history").iterdir()}
    rt = runtime(eng)  # compacts 1-3
    assert listing(store)[4:] == ["history/hist-00000003.safetensors"]
    for name, data in moved.items():  # as if the process had died before removing them
        (store / "history" / name).write_bytes(data)
    hist = rt.heads.history()
    assert [h["generation"] for h in hist] == list(range(5, -1, -1)) and all(h["available"] for h in hist)
    rt = runtime(eng)  # compacts again: nothing written twice, the leftovers removed
    assert listing(store)[4:] == ["history/hist-00000003.safetensors"]
    for g in range(0, 5):
        rt.heads.rollback(g)
        assert_same(snapshot(rt), snaps[g])
    rt.heads.rollback(5)
    assert_same(snapshot(rt), snaps[5])


def test_the_merged_store_keeps_its_history(engines, tmp_path):
    from helpers import invoke

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    for name, c in (("a", 6), ("b", 7)):
        rt = runtime(eng, store=tmp_path / name)
        rt.enroll_frames(f"n{c}", class_frames(c, 4))
        rt.heads.commit()
    res = invoke(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    rt = runtime(eng, store=tmp_path / "a")
    hist = rt.heads.history()
    assert [h["ops"][0]["op"] for h in hist] == ["merge", "enroll", "engine"]
    rt.heads.rollback(1)
    assert rt.classes[-1] == "n6" and "n7" not in rt.classes
