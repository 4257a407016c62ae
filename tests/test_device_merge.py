"""edgecl.device.store: `edgecl merge` unites enrolled contributions by id (idempotent, order-free,
exact), stores written before contribution ids merge idempotently too, removals and name clashes
are handled and reported; unreadable generations are set aside, never deleted."""

import hashlib
import json

import numpy as np
import pytest
from helpers import class_frames, fresh_copy, invoke, one_line_error, runtime


def enroll(eng, store, classes, commit=True):
    """A runtime of ``eng`` on ``store`` that enrolls ``classes`` ({name: frames}) and commits."""
    rt = runtime(eng, store=store)
    for name, frames in classes.items():
        rt.enroll_frames(name, frames)
    if commit:
        rt.heads.commit()
    return rt


def merge(*stores, out, engine_dir=None):
    """``edgecl merge STORES --out OUT`` through the CLI; returns its output."""
    args = ["merge", *map(str, stores), "--out", str(out)] + (["--engine-dir", str(engine_dir)] if engine_dir else [])
    res = invoke(args)
    assert res.exit_code == 0, res.output
    return res.output


def files(store):
    """{name: bytes} of a store directory's generations."""
    return {f.name: f.read_bytes() for f in sorted(store.glob("gen-*"))}


def contributions(state) -> dict:
    """{contribution id: (class name, its rows as bytes)}."""
    names = {c.uid: c.name for c in state.classes if c.uid is not None}
    groups = state.contribution_rows()
    return {c.id: (names[c.uid], state.rows["main"][groups[i]].tobytes()) for i, c in enumerate(state.contributions)}


def assert_same_heads(a, b, order=True):
    """Two runtimes hold the same classes, rows, contributions, statistics and solved W."""
    sa, sb = a.heads.state, b.heads.state
    assert (a.classes == b.classes) if order else (sorted(a.classes) == sorted(b.classes))
    assert contributions(sa) == contributions(sb)
    assert len(sa.row_uid) == len(sb.row_uid)
    if not order:
        return
    ha, hb = a.heads.heads["main"], b.heads.heads["main"]
    for x, y in zip(ha.ridge().statistics()[:2], hb.ridge().statistics()[:2]):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ha.current, hb.current, atol=1e-6 * max(1.0, np.abs(hb.current).max()))


@pytest.fixture
def eng(engines, tmp_path):
    return fresh_copy(engines["main"], tmp_path / "eng")


@pytest.fixture
def frames():
    return {c: class_frames(c, 8, seed=c) for c in (6, 7, 8, 9)}


def test_merge_with_itself_changes_nothing(eng, frames, tmp_path):
    # enrolled out of name order: the merge keeps the store's order (first enrollment time)
    a = enroll(eng, tmp_path / "a", {"zeta": frames[6], "alpha": frames[7]})
    out = merge(tmp_path / "a", tmp_path / "a", out=tmp_path / "m")
    m = runtime(eng, store=tmp_path / "m")
    assert m.classes == a.classes and m.classes[-2:] == ["zeta", "alpha"]
    assert_same_heads(m, a)
    np.testing.assert_array_equal(m.heads.heads["main"].current, a.heads.heads["main"].current)  # its W, kept
    assert "2 duplicate contributions skipped" in out and f"the result equals {tmp_path / 'a'}" in out
    assert "'zeta': 1 contribution, 8 rows from" in out and "already present, skipped as a duplicate" in out


def test_merge_is_idempotent_and_order_free(eng, frames, tmp_path):
    from edgecl.device.store import ClassStore, merge_states, store_record

    enroll(eng, tmp_path / "a", {"six": frames[6], "seven": frames[7][:4]})
    enroll(eng, tmp_path / "b", {"seven": frames[7][4:], "eight": frames[8]})
    merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "ab")
    merge(tmp_path / "b", tmp_path / "a", out=tmp_path / "ba")
    merge(tmp_path / "ab", tmp_path / "b", out=tmp_path / "abb")
    merge(tmp_path / "a", tmp_path / "ab", tmp_path / "b", tmp_path / "a", out=tmp_path / "aabba")
    ab = runtime(eng, store=tmp_path / "ab")
    assert ab.classes[-3:] == ["six", "seven", "eight"]  # engine classes, then by first enrollment
    for other in ("ba", "abb", "aabba"):
        assert_same_heads(runtime(eng, store=tmp_path / other), ab)
    # the report of merging a merge with one of its parts: nothing joined, everything a duplicate
    states = [ClassStore(p, store_record(p).engine).load() for p in (tmp_path / "ab", tmp_path / "b")]
    merged, report = merge_states(states, ["ab", "b"])
    assert report.same_as == "ab" and report.joined == [] and report.duplicates == 2
    assert {c.name: (c.contributions, c.stores) for c in report.classes} == {
        "six": (1, ["ab"]), "seven": (2, ["ab", "b"]), "eight": (1, ["ab", "b"])}


def test_merge_in_place_twice_changes_nothing(eng, frames, tmp_path):
    a = enroll(eng, tmp_path / "a", {"six": frames[6], "seven": frames[7][:4]})
    enroll(eng, tmp_path / "b", {"seven": frames[7][4:], "eight": frames[8]})
    rows_a = len(a.heads.state.row_uid)
    out1 = merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "a")
    once = files(tmp_path / "a")
    first = runtime(eng, store=tmp_path / "a")
    assert len(first.heads.state.row_uid) == rows_a + 12 and first.classes[-3:] == ["six", "seven", "eight"]
    assert "'seven': joined across" in out1
    out2 = merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "a")
    assert files(tmp_path / "a") == once  # not even a new generation
    assert "nothing to commit" in out2 and "2 duplicate contributions skipped" in out2
    assert_same_heads(runtime(eng, store=tmp_path / "a"), first)


def test_same_name_on_two_devices_is_joined_exactly(eng, frames, tmp_path):
    enroll(eng, tmp_path / "a", {"six": frames[6], "seven": frames[7][:4]})
    enroll(eng, tmp_path / "b", {"seven": frames[7][4:], "eight": frames[8]})
    out = merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "m", engine_dir=eng)
    lines = out.splitlines()
    assert lines[0].startswith("merge: 2 stores: 3 enrolled classes (1 joined across stores), 4 contributions, "
                               "24 rows; 0 duplicate contributions skipped"), out
    assert f"merge: 'seven': joined across {tmp_path / 'a'}, {tmp_path / 'b'}: 2 contributions, 8 rows" in lines
    assert f"merge: 'six': 1 contribution, 8 rows from {tmp_path / 'a'}" in lines
    merged = runtime(eng, store=tmp_path / "m")
    ref = enroll(eng, tmp_path / "ref", {"six": frames[6], "seven": frames[7], "eight": frames[8]}, commit=False)
    assert merged.classes == ref.classes
    for x, y in zip(merged.heads.heads["main"].ridge().statistics()[:2],
                    ref.heads.heads["main"].ridge().statistics()[:2]):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)  # G and Q: sums over the union of rows
    np.testing.assert_allclose(merged.heads.heads["main"].current, ref.heads.heads["main"].current,
                               atol=1e-4 * np.abs(ref.heads.heads["main"].current).max())


def test_removals_reach_the_merge(eng, frames, tmp_path):
    enroll(eng, tmp_path / "a", {"cat": frames[6], "dog": frames[7]})
    enroll(eng, tmp_path / "b", {"owl": frames[8]})
    merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "b")  # b now holds a's cat and dog too
    a = runtime(eng, store=tmp_path / "a")
    a.heads.remove("cat")
    a.heads.remove("class2")  # an engine class
    a.heads.commit()
    out = merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "m")
    m = runtime(eng, store=tmp_path / "m")
    assert "cat" not in m.classes and "class2" not in m.classes and m.classes[-2:] == ["dog", "owl"]
    assert f"merge: 'cat': removed in {tmp_path / 'a'}: its 1 contribution in {tmp_path / 'b'} dropped; " \
           "not in the merge" in out.splitlines()
    assert f"merge: engine class 'class2' removed in {tmp_path / 'a'}: not in the merge" in out
    # b enrolls more of cat on its own: the class comes back with only those rows, and says so
    b = runtime(eng, store=tmp_path / "b")
    b.enroll_frames("cat", frames[9])
    b.heads.commit()
    out = merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "m")
    m = runtime(eng, store=tmp_path / "m")
    assert "cat" in m.classes and len(m.heads.state.rows_of(m.heads.state.classes[m.classes.index("cat")].uid)) == 8
    assert "the class comes back with the 1 contribution enrolled elsewhere" in out
    # merging the merge again with b, which still holds the removed rows, brings nothing back
    out = merge(tmp_path / "m", tmp_path / "b", out=tmp_path / "m")
    assert "nothing to commit" in out


def test_name_clashes_are_refused(eng, frames, tmp_path):
    enroll(eng, tmp_path / "a", {"cat": frames[6]})
    merge(tmp_path / "a", out=tmp_path / "b")
    b = runtime(eng, store=tmp_path / "b")
    b.heads.rename("cat", "kitty")  # the same enrollment under another name
    b.heads.commit()
    one_line_error(invoke(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]),
                   "is class 'cat' in", "and 'kitty' in", "rename it the same way first")
    c = runtime(eng, store=tmp_path / "c")
    c.heads.rename("class0", "first")
    c.heads.commit()
    d = runtime(eng, store=tmp_path / "d")
    d.heads.rename("class0", "zeroth")
    d.heads.commit()
    one_line_error(invoke(["merge", str(tmp_path / "c"), str(tmp_path / "d"), "--out", str(tmp_path / "m")]),
                   "engine class 0 is named")
    e = runtime(eng, store=tmp_path / "e", policy={"alpha": 1.0, "beta": 1.0})
    e.enroll_frames("x", frames[6])
    e.heads.commit()
    one_line_error(invoke(["merge", str(tmp_path / "a"), str(tmp_path / "e"), "--out", str(tmp_path / "m")]),
                   "different enrollment weighting")


def write_old_store(store, state):
    """``state`` as a store written before contribution ids (no row_contrib, no contributions)."""
    from safetensors.numpy import save

    raw = state.to_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    meta = {k: v for k, v in json.loads(header["__metadata__"]["state"]).items()
            if k not in ("contributions", "removed_contributions")}
    tensors = {"row_uid": state.row_uid, **{f"{ln}.rows": r for ln, r in state.rows.items()},
               **{f"{ln}.W": w for ln, w in state.W.items()}}
    data = save(tensors, metadata={"state": json.dumps(meta)})
    store.mkdir(parents=True)
    (store / "gen-00000001.safetensors").write_bytes(data)
    record = {"generation": 1, "file": "gen-00000001.safetensors", "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "engine": meta["engine"], "classes": len(state.classes),
              "created": "", "format": "edgecl-store", "format_version": 1}
    (store / "gen-00000001.json").write_text(json.dumps(record))


def test_stores_without_contribution_ids_merge_idempotently(eng, frames, tmp_path):
    for name, classes in (("a", {"six": frames[6], "seven": frames[7][:4]}),
                          ("b", {"seven": frames[7][4:], "eight": frames[8]})):
        rt = enroll(eng, tmp_path / f"new-{name}", classes, commit=False)
        rt.heads.state.W = {"main": rt.heads.heads["main"].solution()}
        write_old_store(tmp_path / name, rt.heads.state)
    a = runtime(eng, store=tmp_path / "a")
    assert [c.rows for c in a.heads.state.contributions] == [8, 4]  # one derived contribution per class
    assert contributions(a.heads.state) == contributions(runtime(eng, store=tmp_path / "a").heads.state)
    merge(tmp_path / "a", tmp_path / "a", out=tmp_path / "aa")
    assert_same_heads(runtime(eng, store=tmp_path / "aa"), a)
    merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "ab")
    merge(tmp_path / "ab", tmp_path / "b", tmp_path / "a", out=tmp_path / "abba")
    assert_same_heads(runtime(eng, store=tmp_path / "abba"), runtime(eng, store=tmp_path / "ab"))
    out = merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "a")  # in place on an old store: converted once
    assert "joined across" in out
    assert "nothing to commit" in merge(tmp_path / "a", tmp_path / "b", out=tmp_path / "a")


def test_unreadable_generations_are_set_aside(eng, frames, tmp_path):
    rt = runtime(eng)
    for c in (6, 7, 8):
        rt.enroll_frames(f"n{c}", frames[c][:5])
        rt.heads.commit()
    store = eng / "store"
    data = bytearray((store / "gen-00000003.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit
    (store / "gen-00000003.safetensors").write_bytes(bytes(data))
    (store / "gen-00000002.json").write_text('{"format": "edgecl-store", "generat')  # a torn record
    damaged = files(store)
    logs = []
    rt2 = runtime(eng, log=logs.append)
    assert rt2.heads.state.generation == 0 and len(rt2.classes) == 6
    assert sum("no generation is readable; starting from the engine directory" in m for m in logs) == 1
    folders = list(store.glob("corrupt-*"))
    assert len(folders) == 1 and files(folders[0]) == damaged  # every damaged file, byte for byte
    moved = [m for m in logs if "moved the unreadable generation(s) 3, 2" in m]
    assert len(moved) == 1 and str(folders[0]) in moved[0], logs
    rt2.enroll_frames("again", frames[9][:5])
    assert rt2.heads.commit() == 4  # numbers keep rising past the set-aside ones
    for c in (6, 7):
        rt2.enroll_frames(f"m{c}", frames[c][:5])
        rt2.heads.commit()
    assert files(folders[0]) == damaged and list(store.glob("corrupt-*")) == folders
    assert sorted(files(store)) == ["gen-00000005.json", "gen-00000005.safetensors", "gen-00000006.json",
                                    "gen-00000006.safetensors"]
    assert runtime(eng).classes[-3:] == ["again", "m6", "m7"]


def test_pruning_sets_aside_a_generation_damaged_after_loading(eng, frames, tmp_path):
    rt = runtime(eng)
    for c in (6, 7):
        rt.enroll_frames(f"n{c}", frames[c][:5])
        rt.heads.commit()
    store = eng / "store"
    data = bytearray((store / "gen-00000001.safetensors").read_bytes())
    data[-3] ^= 0x01
    (store / "gen-00000001.safetensors").write_bytes(bytes(data))  # damaged behind the loaded runtime's back
    damaged = {n: b for n, b in files(store).items() if n.startswith("gen-00000001")}
    logs = []
    rt.heads.store.log = logs.append
    rt.enroll_frames("n8", frames[8][:5])
    assert rt.heads.commit() == 3  # pruning generation 1: unreadable, so set aside, not deleted
    folders = list(store.glob("corrupt-*"))
    assert len(folders) == 1 and files(folders[0]) == damaged
    assert any(str(folders[0]) in m for m in logs), logs
    assert sorted(files(store)) == ["gen-00000002.json", "gen-00000002.safetensors", "gen-00000003.json",
                                    "gen-00000003.safetensors"]
