"""Where a training run's data comes from: the splits it names (located before anything loads) or the
datasets and model the Python API hands over, loaded and checked against their reference's provenance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refdpo import provenance as prov
from refdpo.commands.train_config import TrainConfig
from refdpo.data import PairData, load_pairs, parse_ref_columns
from refdpo.data.loading import SplitLocation, locate_split


@dataclass
class Inputs:
    """What the Python API may hand over instead of naming it in the config (`train`'s keyword arguments)."""

    model: torch.nn.Module | None = None
    tokenizer: object = None
    train_dataset: object = None  # a datasets.Dataset or DatasetDict, or a list of records
    eval_dataset: object = None

    def given(self) -> list[str]:
        """The config fields these stand in for (exempt from `require`)."""
        return ([] if self.model is None else ["model"]) + ([] if self.train_dataset is None else ["dataset"])


def locate_data(cfg: TrainConfig, inputs: Inputs) -> tuple[SplitLocation, SplitLocation | None]:
    """Where the training and validation splits are, checked before anything is loaded. A DatasetDict handed
    over gives both splits by name (train_split, val_split); a Dataset is the training split, and validation
    is `eval_dataset`'s (none without it)."""
    import datasets

    given = inputs.train_dataset
    if given is not None and not isinstance(given, datasets.DatasetDict):
        evaluation = inputs.eval_dataset
        return (locate_split(given, cfg.train_split),
                locate_split(evaluation, cfg.val_split) if evaluation is not None else None)
    source, where = (given if given is not None else cfg.dataset), (cfg.dataset_config, cfg.dataset_revision)
    train_at = locate_split(source, cfg.train_split, *where, role="--train_split")
    if inputs.eval_dataset is not None:
        return train_at, locate_split(inputs.eval_dataset, cfg.val_split)
    val_at = locate_split(source, cfg.val_split, *where, role="--val_split") if cfg.val_split else None
    return train_at, val_at


def load_split_data(cfg: TrainConfig, split: str, location: SplitLocation, limit: int, tokenizer,
               cache: dict | None) -> tuple[PairData, list[str]]:
    """One split as the config says, and the mismatches with its reference columns' provenance it trains
    through (--strict false; with --strict they are refused)."""
    columns = parse_ref_columns(cfg.ref_columns, mix=True) if cfg.objective.uses_reference else None
    data = load_pairs(cfg, split, tokenizer, columns, limit, cache, location)
    mismatches = prov.check_for_training(data, tokenizer, cfg, cfg.strict) if columns is not None else []
    return data.mixed(cfg.ref_mix), mismatches
