"""Shared fixtures: everything is built offline, on the spot (a tokenizer trained with `tokenizers`, a
random-init Llama, synthetic pairs in the RefDPO schema). Nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The disk cache of tokenised splits (data/cache.py): one per test session, never the user's ~/.cache/refdpo.
os.environ["REFDPO_CACHE"] = tempfile.mkdtemp(prefix="refdpo-test-cache-")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from refdpo.testbed.tiny import corpus, synthetic_pairs, train_tokenizer

    return train_tokenizer(corpus(synthetic_pairs(300, seed=1)))


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> Path:
    """A complete tiny setup: model/ (tokenizer + random-init Llama) and data/{train,val}.jsonl whose
    reference log-probs were scored by that model (reference = initial policy), template tulu."""
    from refdpo.testbed.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "setup", train_pairs=256, val_pairs=64, seed=0)


# --- the tiny setup's tokenizer and validation split, shared by the scoring, check and provenance tests ---

@pytest.fixture(scope="session")
def tok(tiny_setup):
    from refdpo.tokenization import load_tokenizer

    return load_tokenizer(str(tiny_setup / "model"))


@pytest.fixture(scope="session")
def val_records(tiny_setup) -> list[dict]:
    from helpers import read_jsonl

    return read_jsonl(tiny_setup / "data" / "val.jsonl")


@pytest.fixture(scope="session")
def val_data(tiny_setup, tok):
    from refdpo.data import build_pairs, load_split

    return build_pairs(load_split(str(tiny_setup / "data"), "val"), tok, "tulu", 512, None)


@pytest.fixture(scope="session")
def small(tiny_setup, val_records, tmp_path_factory) -> Path:
    """A dataset folder whose train.jsonl holds the first 8 val records (cheap to score)."""
    from helpers import write_split

    return write_split(tmp_path_factory.mktemp("small"), val_records[:8])
