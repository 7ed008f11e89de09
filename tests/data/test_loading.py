"""Where a split comes from: JSON lines, the RefDPO hub file layout, parquet, save_to_disk, explicit paths."""

from __future__ import annotations

import json

import datasets
import pytest

from refdpo.data.loading import load_split
from refdpo.errors import DataError

RECORDS = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "no"}],
            "chosen_logprob": -1.0 - i, "rejected_logprob": -2.0 - i, "source": "s"} for i in range(5)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_folder_of_jsonl_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    train, val = load_split(str(tmp_path), "train"), load_split(str(tmp_path), "val")
    assert train.records == RECORDS and len(val) == 2
    assert train.line_numbers == [1, 2, 3, 4, 5] and train.source == str(tmp_path / "train.jsonl")


def test_refdpo_hub_file_layout(tmp_path):
    write_jsonl(tmp_path / "mistral_train.jsonl", RECORDS)
    write_jsonl(tmp_path / "tulu2_train.jsonl", RECORDS[:1])
    assert len(load_split(str(tmp_path), "train", config="mistral")) == 5
    assert len(load_split(str(tmp_path), "train", config="tulu2")) == 1


def test_parquet_split(tmp_path):
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "train.parquet"))
    split = load_split(str(tmp_path), "train")
    assert split.records == RECORDS and split.line_numbers is None


def test_save_to_disk_dataset_dict_and_single_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                               "val": datasets.Dataset.from_list(RECORDS[:3])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_split(str(tmp_path / "dd"), "train").records == RECORDS
    assert len(load_split(str(tmp_path / "dd"), "val")) == 3
    with pytest.raises(DataError, match="split 'test' not found; it has train, val"):
        load_split(str(tmp_path / "dd"), "test")
    datasets.Dataset.from_list(RECORDS[:2]).save_to_disk(str(tmp_path / "one"))
    assert len(load_split("unused", str(tmp_path / "one"))) == 2  # a split given as a saved folder


def test_split_given_as_a_path(tmp_path):
    write_jsonl(tmp_path / "a" / "mine.jsonl", RECORDS[:4])
    assert len(load_split("ignored", str(tmp_path / "a" / "mine.jsonl"))) == 4


def test_single_file_dataset(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    assert len(load_split(str(tmp_path / "pairs.jsonl"), "train")) == 5
    with pytest.raises(DataError, match="single split, so split 'val' must be given as a path"):
        load_split(str(tmp_path / "pairs.jsonl"), "val")


def test_json_array_file(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    assert load_split(str(tmp_path), "train").records == RECORDS


@pytest.mark.parametrize("dataset,split,message", [
    ("{tmp}", "train", "no split 'train' here"),
    ("{tmp}/missing.jsonl", "train", "no such file or folder"),
])
def test_missing_paths(tmp_path, dataset, split, message):
    with pytest.raises(DataError, match=message):
        load_split(dataset.format(tmp=tmp_path), split)


def test_hub_failure_is_one_line():
    # The hub is unreachable here (and HF_DATASETS_OFFLINE=1 in the tests): the real hub code path reports it.
    with pytest.raises(DataError) as info:
        load_split("yale-nlp/RefDPO", "train", config="mistral")
    assert str(info.value).startswith("yale-nlp/RefDPO[mistral]/train: cannot load from the Hugging Face Hub")
    assert "\n" not in str(info.value)
