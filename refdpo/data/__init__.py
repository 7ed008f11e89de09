"""Preference data: loading, validation, chat templates, tokenised pairs, batching."""

from refdpo.data.collate import PackedBatch, PaddedBatch, collate_packed, collate_pairs, to_device
from refdpo.data.loading import RawSplit, load_split
from refdpo.data.pairs import PairData, build_pairs, load_pairs
from refdpo.data.sampler import PairSampler, eval_batches
from refdpo.data.schema import DEFAULT_REF_COLUMNS, parse_ref_columns
from refdpo.data.templates import UNBOUNDED

__all__ = ["DEFAULT_REF_COLUMNS", "UNBOUNDED", "PackedBatch", "PaddedBatch", "PairData", "PairSampler", "RawSplit", "build_pairs", "collate_packed", "collate_pairs",
           "eval_batches", "load_pairs", "load_split", "parse_ref_columns", "to_device"]
