"""Provenance of stored reference log-probs: how `train` compares it with a run (another tokenizer, changed
weights or rows, --strict)."""


from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import (
    KEY,
    entry_of,
    scored,
    train_config,
    write_split,
)

from refdpo import provenance as prov
from refdpo.commands.check import CheckConfig, check
from refdpo.commands.train import train
from refdpo.errors import ConfigError

# --- what train does with it --------------------------------------------------------------------------------


@pytest.mark.parametrize("mismatch", [{"template": "zephyr"}, {"max_len": 40}])
def test_mismatched_reference_columns_are_refused_unless_overridden_and_then_recorded(tiny_setup, tmp_path,
                                                                                      caplog, mismatch):
    expected = "insert_eos" if "template" in mismatch else "scored with max_len 512 but training uses 40"
    with pytest.raises(ConfigError) as refused:
        train(train_config(tiny_setup, tmp_path / "refused", max_train_pairs=8, **mismatch))
    assert expected in str(refused.value) and "--strict false" in str(refused.value)
    assert "\n" not in str(refused.value) and not (tmp_path / "refused" / "metrics.jsonl").exists()
    caplog.set_level("INFO")
    summary = train(train_config(tiny_setup, tmp_path / "lenient", max_train_pairs=8, strict=False, **mismatch))
    assert any(expected in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert any("is the policy itself" in r.getMessage() for r in caplog.records)
    recorded = json.loads((tmp_path / "lenient" / "summary.json").read_text())["reference_mismatches"]
    assert recorded == summary["reference_mismatches"] and expected in recorded["train"][0]
    assert expected in recorded["val"][0]


# --- comparisons --------------------------------------------------------------------------------------------


def test_another_tokenizer_makes_template_and_max_len_incomparable(tiny_setup, tiny_tokenizer, tok, tmp_path):
    from refdpo.testbed.tiny import tiny_llama

    entry = prov.read(tiny_setup / "data" / "val.jsonl.provenance.json")[KEY]
    other = tmp_path / "other"
    tiny_llama(tiny_tokenizer, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    assert prov.tokenizer_fingerprint(tiny_tokenizer) != entry["tokenizer_sha256"]  # premise
    settings = dict(model=str(other), revision=None, template="zephyr", max_len=64, rows=64, longest=500)
    warnings, notes = prov.training_report(entry, tokenizer=tiny_tokenizer, **settings)
    assert warnings == []
    assert any("is not the policy" in n for n in notes)
    # the same settings with the reference's tokenizer: now template and max_len are comparable, and differ
    warnings, _ = prov.training_report(entry, tokenizer=tok, **settings)
    assert len(warnings) == 2
    assert "scored with template 'tulu' (insert_eos False) but training uses 'zephyr'" in warnings[0]
    assert "scored with max_len 512 but training uses 64" in warnings[1]


def test_changed_weights_are_detected(tiny_setup, tok, small, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tmp_path / "ref"
    shutil.copytree(tiny_setup / "model", ref)
    out = tmp_path / "scored.jsonl"
    scored(tiny_setup, out, dataset=small, split="train", model=str(ref))
    entry = entry_of(out)
    settings = dict(revision=None, tokenizer=tok, template="tulu", max_len=512, rows=8, longest=0)
    warnings, notes = prov.training_report(entry, model=str(ref), **settings)
    assert warnings == [] and "is the policy itself" in notes[0]
    # the original weights elsewhere are the same reference (by their fingerprint)
    assert "is the policy itself" in prov.training_report(entry, model=str(tiny_setup / "model"), **settings)[1][0]

    model = AutoModelForCausalLM.from_pretrained(str(ref))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # one weight changed, e.g. a fine-tune saved in place
    model.save_pretrained(ref)
    assert prov.is_same_model(entry, str(ref), None, prov.weights_fingerprint(str(ref))) is False
    warnings, notes = prov.training_report(entry, model=str(ref), **settings)
    assert len(warnings) == 1 and "whose weights have changed since" in warnings[0]
    assert "is not the policy" in notes[0]
    # the changed weights in another folder are simply another model: a note, no warning
    elsewhere = tmp_path / "copy" / "ref"
    shutil.copytree(ref, elsewhere)
    warnings, notes = prov.training_report(entry, model=str(elsewhere), **settings)
    assert warnings == [] and "is not the policy" in notes[0]


def test_rows_changed_after_scoring_warn(tiny_setup, tok, val_records, tmp_path):
    entry = prov.read(tiny_setup / "data" / "val.jsonl.provenance.json")[KEY]
    settings = dict(model=str(tiny_setup / "model"), revision=None, tokenizer=tok, template="tulu", max_len=512,
                    longest=0)
    assert prov.training_report(entry, rows=64, **settings)[0] == []
    warnings, _ = prov.training_report(entry, rows=63, **settings)
    assert warnings == ["64 rows were scored but the split now has 63: the data changed after scoring"]
    # end to end: a row deleted from a scored file, whose sidecar stays beside it
    data = write_split(tmp_path / "d", val_records[:-1], name="val")
    shutil.copy(tiny_setup / "data" / "val.jsonl.provenance.json", data / "val.jsonl.provenance.json")
    report = check(CheckConfig(dataset=str(data), split="val", model=str(tiny_setup / "model"), max_len=512,
                               sample=8).validate())
    assert report["errors"] == []
    assert any("the data changed after scoring" in w for w in report["warnings"]), report["warnings"]
