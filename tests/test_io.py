"""io.atomic_folder: a folder is replaced whole or not at all."""

from __future__ import annotations

import pytest

from refdpo.io import atomic_folder


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
