"""The disk cache of tokenised splits (data/cache.py): a second load reads back exactly what the first built,
and anything the result depends on (content, max_len, template, columns, limit) makes a new entry."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from helpers import COLUMNS, scored

from refdpo.config import DataSpec
from refdpo.data import load_pairs
from refdpo.data import pairs as pairs_module


def spec(dataset, cache, **overrides) -> DataSpec:
    return DataSpec(**{"dataset": str(dataset), "template": "tulu", "max_len": 512, "cache_dir": str(cache),
                       **overrides})


@pytest.fixture
def counted(monkeypatch):
    """How many times a split was really built (validated and tokenised)."""
    calls = []
    real = pairs_module.build_pairs
    monkeypatch.setattr(pairs_module, "build_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def assert_same(a, b):
    assert len(a) == len(b) and a.stats == b.stats and np.array_equal(a.rows, b.rows)
    for side in ("chosen", "rejected"):
        for x, y in zip(getattr(a, side), getattr(b, side)):
            assert np.array_equal(x.input_ids, y.input_ids) and x.input_ids.dtype == y.input_ids.dtype
            assert (x.response_start, x.full_length) == (y.response_start, y.full_length)
    for side in ("ref_chosen", "ref_rejected"):
        assert (getattr(a, side) is None and getattr(b, side) is None) or np.array_equal(getattr(a, side),
                                                                                     getattr(b, side))


def test_second_load_reads_the_cache_and_equals_the_first(tiny_setup, tok, tmp_path, counted, caplog):
    data = tiny_setup / "data"
    first = load_pairs(spec(data, tmp_path), "val", tok, COLUMNS)
    with caplog.at_level(logging.INFO, logger="refdpo"):
        second = load_pairs(spec(data, tmp_path), "val", tok, COLUMNS)
    assert len(counted) == 1, "the second load tokenised again"
    assert "read from the cache" in caplog.text
    assert_same(first, second)
    assert second.origin == first.origin and second.source == first.source


@pytest.mark.parametrize("change", ["max_len", "template", "columns", "limit", "content"])
def test_what_the_result_depends_on_makes_a_new_entry(tiny_setup, tok, tmp_path, counted, change):
    data = tmp_path / "data"
    shutil.copytree(tiny_setup / "data", data)
    load_pairs(spec(data, tmp_path / "c"), "val", tok, COLUMNS)
    args = dict(spec=spec(data, tmp_path / "c"), columns=COLUMNS, limit=0)
    if change == "max_len":
        args["spec"] = spec(data, tmp_path / "c", max_len=64)
    elif change == "template":
        args["spec"] = spec(data, tmp_path / "c", template="zephyr")
    elif change == "columns":
        args["columns"] = None
    elif change == "limit":
        args["limit"] = 5
    else:
        lines = (data / "val.jsonl").read_text().splitlines()
        (data / "val.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same rows, other order
    again = load_pairs(args["spec"], "val", tok, args["columns"], args["limit"])
    assert len(counted) == 2, f"a changed {change} read a stale entry"
    if change == "content":
        assert again.rows.tolist() == list(range(len(again)))  # rebuilt from the new order


def test_cache_dir_none_writes_nothing_and_a_broken_entry_is_rebuilt(tiny_setup, tok, tmp_path, counted):
    data = tiny_setup / "data"
    load_pairs(spec(data, "none"), "val", tok, None)
    assert not any(tmp_path.iterdir())
    first = load_pairs(spec(data, tmp_path), "val", tok, None)
    (entry,) = (tmp_path / "pairs").iterdir()
    (entry / "ids.npy").write_bytes(b"not an array")
    again = load_pairs(spec(data, tmp_path), "val", tok, None)
    assert len(counted) == 3
    assert_same(first, again)


def test_provenance_is_checked_on_a_cache_hit(tiny_setup, tok, tmp_path):
    """The cache keeps what the provenance check needs of the whole split: a mismatch is still refused."""
    from refdpo import provenance as prov
    from refdpo.errors import ConfigError

    out = tmp_path / "scored" / "val.jsonl"
    scored(tiny_setup, out)
    cfg = spec(out.parent, tmp_path / "c", template="zephyr")  # scored with tulu
    for _ in range(2):
        data = load_pairs(cfg, "val", tok, COLUMNS)
        cfg.model, cfg.revision, cfg.strict = str(tiny_setup / "model"), None, True
        with pytest.raises(ConfigError, match="scored with template 'tulu'"):
            prov.check_for_training(data, tok, cfg, strict=True)
    assert data.origin["conversations_sha256"] is not None and data.origin["rows_total"] == len(data)
