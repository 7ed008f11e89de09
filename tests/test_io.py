"""io.atomic_folder: a folder is replaced whole or not at all."""

from __future__ import annotations

import pytest

from refdpo.io import atomic_folder, json_safe


def test_atomic_folder_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with atomic_folder(out) as tmp:
        assert not (out / "new.txt").exists()  # nothing shows before the block completes
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_json_safe_makes_non_finite_floats_null_and_float_keys_text():
    value = {"a": [1.0, float("nan"), (float("inf"), -float("inf"))], 0.3: {"b": 2, 10.0: None}, "c": "x"}
    assert json_safe(value) == {"a": [1.0, None, [None, None]], "0.3": {"b": 2, "10": None}, "c": "x"}
