"""edgecl.device.store: generations that survive corruption (a flipped bit, a torn record),
the store of another engine refused, `edgecl merge` summing statistics exactly.
(SIGKILL during commits: test_device_kill.py.)"""

import numpy as np
import pytest
from helpers import class_frames, fresh_copy, invoke, one_line_error, runtime


def test_store_generations_survive_corruption(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    rt = runtime(eng)
    for i, c in enumerate((6, 7, 8)):
        rt.enroll_frames(f"n{c}", class_frames(c, 5, seed=i))
        rt.heads.commit()
    store = eng / "store"
    assert sorted(p.name for p in store.glob("gen-*")) == [
        "gen-00000002.json", "gen-00000002.safetensors", "gen-00000003.json", "gen-00000003.safetensors"]
    logs = []
    data = bytearray((store / "gen-00000003.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the newest generation
    (store / "gen-00000003.safetensors").write_bytes(bytes(data))
    rt2 = runtime(eng, log=logs.append)
    assert rt2.heads.state.generation == 2 and rt2.classes[-1] == "n7"
    assert any("generation 3 is unusable" in m for m in logs)
    (store / "gen-00000002.json").write_text('{"format": "edgecl-store", "generat')  # torn record
    logs.clear()
    rt3 = runtime(eng, log=logs.append)
    assert rt3.heads.state.generation == 0 and len(rt3.classes) == 6
    assert any("starting from the engine directory" in m for m in logs)
    # a commit after recovery writes a new, higher generation; the damaged ones are pruned
    rt3.enroll_frames("again", class_frames(9, 5, seed=0))
    assert rt3.heads.commit() == 4


def test_store_of_another_engine_is_refused(engines, tmp_path):
    from edgecl.core.errors import EdgeclError

    a = runtime(fresh_copy(engines["main"], tmp_path / "a"), store=tmp_path / "s")
    a.enroll_frames("x", class_frames(7, 5, seed=0))
    a.heads.commit()
    with pytest.raises(EdgeclError, match="belongs to another engine"):
        runtime(fresh_copy(engines["other"], tmp_path / "b"), store=tmp_path / "s")


def test_merge_sums_statistics_exactly(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    f6, f7, f8 = (class_frames(c, 8, seed=c) for c in (6, 7, 8))
    a = runtime(eng, store=tmp_path / "a")
    a.enroll_frames("six", f6)
    a.enroll_frames("seven", f7[:4])
    a.heads.commit()
    b = runtime(eng, store=tmp_path / "b")
    b.enroll_frames("seven", f7[4:])
    b.enroll_frames("eight", f8)
    b.heads.commit()
    res = invoke(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m"),
                  "--engine-dir", str(eng)])
    assert res.exit_code == 0, res.output
    merged = runtime(eng, store=tmp_path / "m")
    ref = runtime(eng, store=tmp_path / "ref")  # one device that saw everything
    ref.enroll_frames("six", f6)
    ref.enroll_frames("seven", f7)
    ref.enroll_frames("eight", f8)
    assert merged.classes == ref.classes
    for i in range(2):
        np.testing.assert_allclose(merged.heads.heads["main"].ridge().statistics()[i],
                                   ref.heads.heads["main"].ridge().statistics()[i], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged.heads.heads["main"].current, ref.heads.heads["main"].current,
                               atol=1e-4 * np.abs(ref.heads.heads["main"].current).max())

    c = runtime(fresh_copy(engines["other"], tmp_path / "other"), store=tmp_path / "c")
    c.enroll_frames("x", f6)
    c.heads.commit()
    one_line_error(invoke(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "m2")]),
                   "different engines")
