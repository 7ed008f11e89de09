"""`refdpo score`: self-reference gives ln 2, float64 agreement, any tokenizer works, prior mode, kill-and-resume
byte-identical, two processes equal one; its edges: output formats, several references in one dataset, safety,
the merge's coverage check, truncation, bad input, the shared-prompt layout, batch plans."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    COLUMNS,
    KEY,
    REPO,
    entry_of,
    read_jsonl,
    run_cli,
    run_main,
    scored,
    train_config,
    write_jsonl,
    write_split,
)

import refdpo.commands.score as score_mod
from refdpo import provenance as prov
from refdpo.commands import score_job as shards
from refdpo.commands.check import CheckConfig, check
from refdpo.commands.score import (
    decide_layout,
    plan_batches,
    score_batch,
    score_data,
)
from refdpo.commands.score_job import merge_blocks
from refdpo.commands.train import train
from refdpo.core.logprobs import reference_logprobs_float64
from refdpo.data import PairData, build_pairs, collate_pairs, load_split
from refdpo.data.collate import collate_packed, shares_prompt
from refdpo.data.pairs import reference_pairs
from refdpo.data.templates import Encoded
from refdpo.data.writing import output_format
from refdpo.errors import ConfigError, DataError, DataErrors, RefdpoError
from refdpo.modeling import mask_dtype as modeling_mask_dtype
from refdpo.modeling import pad_token_id
from refdpo.provenance import sidecar_path
from refdpo.tokenization import load_tokenizer

LN2 = math.log(2)


def test_self_reference_scored_then_trained_gives_ln2_and_zero_rewards(tiny_setup, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):  # columns stripped, then scored afresh by the CLI
        records = read_jsonl(tiny_setup / "data" / f"{split}.jsonl")[:24]
        for r in records:
            del r["chosen_logprob"], r["rejected_logprob"]
        (tmp_path / "raw").mkdir(exist_ok=True)
        write_jsonl(tmp_path / "raw" / f"{split}.jsonl", records)
        done = run_cli(["score", "--model", str(tiny_setup / "model"), "--dataset", str(tmp_path / "raw"),
                        "--split", split, "--out", str(data / f"{split}.jsonl"), "--max_len", "512",
                        "--batch_tokens", "1024"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "each row once" in done.stdout
        assert "\r" not in done.stderr and "score: 100%" in done.stderr  # no tty: the bar as log lines
    summary = train(train_config(tiny_setup, tmp_path / "run", dataset=str(data), epochs=1))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(e for e in evals if "val_loss" in e)
    first_step = next(e for e in evals if "loss" in e)
    assert first_eval["step"] == 0 and first_eval["val_loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(first_eval["val_reward_chosen"]) < 1e-5 and abs(first_eval["val_reward_rejected"]) < 1e-5
    assert first_step["loss"] == pytest.approx(LN2, abs=1e-5) and abs(first_step["margin"]) < 1e-5
    assert summary["steps"] == 3


def test_scores_equal_a_float64_computation(tiny_setup, tmp_path):
    out = tmp_path / "scored.jsonl"
    scored(tiny_setup, out, split="val", batch_tokens=700)  # several length buckets
    tokenizer = load_tokenizer(str(tiny_setup / "model"))
    data = build_pairs(load_split(str(out), "train"), tokenizer, "tulu", 512, ("chosen_logprob", "rejected_logprob"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.float64).eval()
    n = len(data)
    exact = reference_logprobs_float64(model, collate_pairs(data, np.arange(n), np.ones(n),
                                                            pad_token_id(tokenizer))).numpy()
    assert np.max(np.abs(data.ref_chosen - exact[:n])) < 1e-4
    assert np.max(np.abs(data.ref_rejected - exact[n:])) < 1e-4


def test_a_reference_with_another_tokenizer_scores_and_trains(tiny_setup, tmp_path):
    from refdpo.testbed.tiny import corpus, synthetic_pairs, tiny_llama, train_tokenizer

    other_tok = train_tokenizer(corpus(synthetic_pairs(200, seed=7)), vocab_size=384)
    ours = load_tokenizer(str(tiny_setup / "model"))
    assert len(other_tok) != len(ours) and other_tok.get_vocab() != ours.get_vocab()
    other = tiny_llama(other_tok, hidden=48, layers=1, heads=2, kv_heads=1, seed=3)
    other.save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    data = tmp_path / "data"
    for split in ("train", "val"):
        scored(tiny_setup, data / f"{split}.jsonl", split=split, model=str(tmp_path / "other"),
                        columns="other_chosen,other_rejected")
        records = read_jsonl(data / f"{split}.jsonl")
        assert {"chosen_logprob", "other_chosen", "other_rejected"} <= set(records[0])  # both references kept
        assert any(r["other_chosen"] != r["chosen_logprob"] for r in records)
    summary = train(train_config(tiny_setup, tmp_path / "run", dataset=str(data), max_train_pairs=32,
                                 ref_columns="other_chosen,other_rejected"))
    assert summary["steps"] == 4 and math.isfinite(summary["best_val_loss"])
    assert abs(summary["best_val_loss"] - LN2) > 1e-3  # another reference: not the policy's own ln 2


def test_prior_mode_equals_conditional_scoring_with_the_prompt_replaced(tiny_setup, tmp_path):
    prefix = "empty_user"
    scored(tiny_setup, tmp_path / "prior.jsonl", split="val", mode="prior", prior_prefix=prefix)
    replaced = []
    for r in read_jsonl(tiny_setup / "data" / "val.jsonl"):
        head = [{"role": "user", "content": ""}]
        replaced.append({"chosen": head + r["chosen"][-1:], "rejected": head + r["rejected"][-1:]})
    (tmp_path / "replaced").mkdir()
    write_jsonl(tmp_path / "replaced" / "val.jsonl", replaced)
    scored(tiny_setup, tmp_path / "cond.jsonl", dataset=str(tmp_path / "replaced"), split="val")
    prior, cond = read_jsonl(tmp_path / "prior.jsonl"), read_jsonl(tmp_path / "cond.jsonl")
    assert len(prior) == len(cond) == 64
    for a, b in zip(prior, cond):
        assert a["chosen_logprob"] == pytest.approx(b["chosen_logprob"], abs=1e-5)
        assert a["rejected_logprob"] == pytest.approx(b["rejected_logprob"], abs=1e-5)
    conditional = read_jsonl(tiny_setup / "data" / "val.jsonl")
    assert all(a["chosen_logprob"] != c["chosen_logprob"] for a, c in zip(prior, conditional))
    entry = json.loads((tmp_path / "prior.jsonl.provenance.json").read_text())["references"]
    assert entry["chosen_logprob,rejected_logprob"]["mode"] == "prior"
    assert entry["chosen_logprob,rejected_logprob"]["prior_prefix"] == prefix


@pytest.mark.parametrize("prefix", ["assistant", "bos"])
def test_prior_without_a_user_turn_scores_the_documented_tokens(tiny_setup, tmp_path, prefix):
    """`assistant`: BOS <|assistant|>\n y </s>; `bos`: BOS y EOS. Scores equal float64 on exactly those tokens."""
    tokenizer = load_tokenizer(str(tiny_setup / "model"))
    raw = load_split(str(tiny_setup / "data"), "val")
    data, rendered = reference_pairs(raw, tokenizer, "tulu", 512, "drop", "prior", prefix)
    reply = raw.records[0]["chosen"][-1]["content"].strip()
    head = "<|assistant|>\n" if prefix == "assistant" else ""
    expected = tokenizer(f"{tokenizer.bos_token}{head}{reply}{tokenizer.eos_token}",
                         add_special_tokens=False)["input_ids"]
    assert data.chosen[0].input_ids.tolist() == expected
    assert data.chosen[0].response_start == len(tokenizer(f"{tokenizer.bos_token}{head}",
                                                          add_special_tokens=False)["input_ids"])
    scored(tiny_setup, tmp_path / "prior.jsonl", split="val", mode="prior", prior_prefix=prefix)
    stored = read_jsonl(tmp_path / "prior.jsonl")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.float64).eval()
    n = len(data)
    exact = reference_logprobs_float64(model, collate_pairs(data, np.arange(n), np.ones(n),
                                                            pad_token_id(tokenizer))).numpy()
    assert np.max(np.abs(np.array([r["chosen_logprob"] for r in stored]) - exact[:n])) < 1e-4
    assert np.max(np.abs(np.array([r["rejected_logprob"] for r in stored]) - exact[n:])) < 1e-4


def _scrub(path: Path) -> dict:
    """Provenance without its time stamp."""
    entries = json.loads(path.read_text())["references"]
    for entry in entries.values():
        entry.pop("created")
        entry.pop("coverage")
    return entries


def test_kill_and_resume_gives_byte_identical_output(tiny_setup, tmp_path):
    args = ["score", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"), "--split",
            "train", "--max_len", "512", "--batch_tokens", "256", "--save_every", "1", "--no-progress"]
    full = run_cli(args + ["--out", str(tmp_path / "full.jsonl")])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed.jsonl"
    parts = tmp_path / "killed.jsonl.parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "refdpo", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("block-*.npz"))) < 5:
        time.sleep(0.002)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((parts / "manifest.json").read_text())
    done = len(list(parts.glob("block-*.npz")))
    assert not out.exists() and 5 <= done < manifest["blocks"]

    resumed = run_cli(args + ["--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert not parts.exists()
    assert _scrub(tmp_path / "killed.jsonl.provenance.json") == _scrub(tmp_path / "full.jsonl.provenance.json")


@pytest.mark.xdist_group("launches")
@pytest.mark.parametrize("flags", [["--multi_gpu"], ["--use_fsdp", "--fsdp_version", "2"],
                                   ["--use_deepspeed", "--zero_stage", "3"]], ids=["ddp", "fsdp2", "zero3"])
def test_two_processes_score_each_row_once_and_equal_one_process(tiny_setup, tmp_path, flags):
    args = ["score", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"), "--split",
            "train", "--max_len", "512", "--batch_tokens", "512", "--save_every", "2", "--no-progress"]
    single = run_cli(args + ["--out", str(tmp_path / "one.jsonl")])
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(29800 + sum(map(len, flags))), "-m", "refdpo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    double = subprocess.run(launch + args + ["--out", str(tmp_path / "two.jsonl")], capture_output=True,
                            text=True, env=env, timeout=600, cwd=REPO)
    assert double.returncode == 0, double.stderr[-3000:]
    if flags != ["--multi_gpu"]:  # training engines: scoring says it stays data-parallel
        assert "scoring is data-parallel under" in double.stderr
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert len(one) == len(two) == 256
    assert [r["prompt_id"] for r in one] == [r["prompt_id"] for r in two]
    for a, b in zip(one, two):
        assert b["chosen_logprob"] == pytest.approx(a["chosen_logprob"], abs=1e-5)
        assert b["rejected_logprob"] == pytest.approx(a["rejected_logprob"], abs=1e-5)
    coverage = json.loads((tmp_path / "two.jsonl.provenance.json").read_text())["references"][
        "chosen_logprob,rejected_logprob"]["coverage"]
    assert coverage == {"processes": 2, "rows_scored": 256, "duplicates": 0, "missing": 0, "unexpected": 0}


# --- edges: formats, several references, safety, the merge, truncation, bad input, layouts, plans ---------------

MAX_LEN = 30  # cuts some val prompts (21..72 tokens) entirely, others only partly


# --- helpers and shared material ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outputs(tiny_setup, tmp_path_factory) -> dict[str, Path]:
    """The val split scored once into each output format (each in its own folder: see the sidecar test)."""
    base = tmp_path_factory.mktemp("formats")
    paths = {"jsonl": base / "jsonl" / "val.jsonl", "parquet": base / "parquet" / "val.parquet",
             "arrow": base / "folder" / "val"}
    for kind, out in paths.items():
        summary = scored(tiny_setup, out)
        assert summary["format"] == kind == output_format(out)
        assert Path(summary["provenance"]) == sidecar_path(out)
    return paths


@pytest.fixture(scope="module")
def models(tiny_setup) -> dict:
    from transformers import AutoModelForCausalLM

    loaded = {}
    for attn in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_setup / "model"), attn_implementation=attn)
        loaded[attn] = model.eval().requires_grad_(False)
    return loaded


def oracle(model, encoded: Encoded) -> float:
    """log p(response | prompt) of one sequence: a plain forward, log-softmax in float64."""
    ids = torch.from_numpy(encoded.input_ids)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    start = encoded.response_start
    return float(logits[start - 1:-1].log_softmax(-1).gather(1, ids[0, start:, None]).sum())


# --- 1. output formats ----------------------------------------------------------------------------------------

def test_every_output_format_holds_the_same_values_and_its_provenance(outputs, val_records):
    loaded = {}
    for kind, out in outputs.items():
        raw = load_split(str(out.parent), str(out))  # a split given by its path: file or save_to_disk folder
        assert raw.provenance == sidecar_path(out) and raw.provenance.is_file(), kind
        entry = prov.read(raw.provenance)[KEY]
        assert entry["columns"] == list(COLUMNS) and entry["rows_in"] == entry["rows_out"] == len(raw) == 64
        loaded[kind] = raw.records
    assert sidecar_path(outputs["arrow"]) == outputs["arrow"] / "refdpo_provenance.json"
    assert loaded["parquet"] == loaded["jsonl"]
    assert loaded["arrow"] == loaded["jsonl"]

    # JSON lines: every original field, in its original order, rows in their original order; the rescored
    # values are those stored by the same model when the setup was built
    assert len(loaded["jsonl"]) == len(val_records)
    for before, after in zip(val_records, loaded["jsonl"]):
        assert list(after) == list(before)
        assert {k: v for k, v in after.items() if k not in COLUMNS} == {k: v for k, v in before.items()
                                                                        if k not in COLUMNS}
        for column in COLUMNS:
            assert after[column] == pytest.approx(before[column], abs=1e-4)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_parquet_and_folder_keep_a_field_the_first_record_lacks(kind, tiny_setup, val_records, tmp_path):
    records = copy.deepcopy(val_records[:8])
    records[5]["source"] = "added-later"  # e.g. a dataset concatenated from two sources
    data = write_split(tmp_path / "in", records)
    out = tmp_path / ("val.parquet" if kind == "parquet" else "val")
    scored(tiny_setup, out, dataset=data, split="train")
    assert load_split(str(tmp_path), str(out)).records[5].get("source") == "added-later"


def test_mixed_type_field_in_parquet_output(tiny_setup, val_records, tmp_path):
    records = copy.deepcopy(val_records[:8])
    records[0]["score"], records[1]["score"] = 5, "n/a"  # fine in JSON lines
    data = write_split(tmp_path / "in", records)
    out = tmp_path / "val.parquet"
    try:
        scored(tiny_setup, out, dataset=data, split="train")
    except RefdpoError:
        return  # a one-line error for the user is acceptable
    assert load_split(str(tmp_path), str(out)).records[1]["score"] == "n/a"


def test_outputs_follow_the_umask(tiny_setup, small, tmp_path):
    old = os.umask(0o022)
    try:
        for name in ("a.jsonl", "b.parquet", "folder"):
            scored(tiny_setup, tmp_path / name, dataset=small, split="train")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert modes == {"a.jsonl": 0o644, "a.jsonl.provenance.json": 0o644, "b.parquet": 0o644,
                     "b.parquet.provenance.json": 0o644, "folder": 0o755}


def test_a_scored_folder_is_a_dataset(outputs):
    assert len(load_split(str(outputs["arrow"]), "train")) == 64


# --- 2. several references in one dataset ------------------------------------------------------------------

def test_a_second_reference_keeps_the_first(tiny_setup, outputs, tmp_path):
    first = outputs["jsonl"]
    second = tmp_path / "two.jsonl"
    scored(tiny_setup, second, dataset=first, split="train", columns="ref2_chosen,ref2_rejected")
    before, after = read_jsonl(first), read_jsonl(second)
    assert [{k: v for k, v in r.items() if not k.startswith("ref2_")} for r in after] == before  # bit for bit
    assert list(after[0]) == list(before[0]) + ["ref2_chosen", "ref2_rejected"]
    for r in after:  # the same model scored both pairs
        assert r["ref2_chosen"] == pytest.approx(r["chosen_logprob"], abs=1e-5)
        assert r["ref2_rejected"] == pytest.approx(r["rejected_logprob"], abs=1e-5)
    entries = prov.read(sidecar_path(second))
    assert set(entries) == {KEY, "ref2_chosen,ref2_rejected"}
    refreshed = ("rows_out", "conversations_sha256")  # describe the new file; the rest is carried through
    assert {k: v for k, v in entries[KEY].items() if k not in refreshed} == {
        k: v for k, v in entry_of(first).items() if k not in refreshed}
    assert entries[KEY]["rows_out"] == 64
    assert entries["ref2_chosen,ref2_rejected"]["columns"] == ["ref2_chosen", "ref2_rejected"]
    report = check(CheckConfig(dataset=str(second)).validate())  # check sees every pair with provenance
    assert set(report["columns"]) == set(entries) and report["errors"] == []


def test_rows_dropped_by_a_second_reference_keep_the_first_entry_consistent(tiny_setup, tok, outputs, tmp_path):
    second = tmp_path / "two.jsonl"
    scored(tiny_setup, second, dataset=outputs["jsonl"], split="train", columns="ref2_chosen,ref2_rejected",
           max_len=MAX_LEN)
    rows = len(read_jsonl(second))
    assert rows < 64 and entry_of(second, "ref2_chosen,ref2_rejected")["rows_out"] == rows
    warnings, _ = prov.training_report(entry_of(second), model=str(tiny_setup / "model"), revision=None,
                                       tokenizer=tok, template="tulu", max_len=512, rows=rows, longest=0)
    assert warnings == []


@pytest.mark.parametrize("columns", ["chosen,rejected", "lp,lp"])
def test_columns_that_would_corrupt_the_output_are_refused(columns, tiny_setup, small, tmp_path):
    with pytest.raises(RefdpoError):
        scored(tiny_setup, tmp_path / "out.jsonl", dataset=small, split="train", columns=columns)


def test_scoring_beside_another_output_keeps_its_provenance(tiny_setup, small, tmp_path):
    scored(tiny_setup, tmp_path / "data.jsonl", dataset=small, split="train")
    try:
        scored(tiny_setup, tmp_path / "data.parquet", dataset=small, split="train", template="zephyr")
    except ConfigError:
        return  # refusing is a fix too
    assert entry_of(tmp_path / "data.jsonl")["template"] == "tulu"


# --- 3. safety --------------------------------------------------------------------------------------------------

def test_an_existing_output_needs_overwrite(tiny_setup, small, tmp_path):
    out = tmp_path / "val.jsonl"
    out.write_text("precious\n")
    with pytest.raises(ConfigError, match=re.escape(str(out))) as error:
        scored(tiny_setup, out, dataset=small, split="train")
    assert "--overwrite" in str(error.value)
    assert out.read_text() == "precious\n" and not (tmp_path / "val.jsonl.parts").exists()
    scored(tiny_setup, out, dataset=small, split="train", overwrite=True)
    assert len(read_jsonl(out)) == 8 and entry_of(out)["rows_out"] == 8


def test_an_existing_output_is_refused_before_the_model_is_loaded(tiny_setup, small, tmp_path, monkeypatch):
    out = tmp_path / "val.jsonl"
    out.write_text("precious\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(score_mod, "load_frozen", no_model)
    with pytest.raises(ConfigError):
        scored(tiny_setup, out, dataset=small, split="train")


def test_an_unfinished_job_with_other_settings_is_refused(tiny_setup, small, tmp_path, monkeypatch):
    out, parts = tmp_path / "val.jsonl", tmp_path / "val.jsonl.parts"
    settings = dict(dataset=small, split="train", save_every=1, max_batch_pairs=1)  # 8 blocks of one pair
    real_save, saved = shards.save_block, []

    class Killed(Exception):
        pass

    def save_then_die(*args):  # a kill after two blocks
        if len(saved) == 2:
            raise Killed
        real_save(*args)
        saved.append(args[0])

    monkeypatch.setattr(shards, "save_block", save_then_die)
    with pytest.raises(Killed):
        scored(tiny_setup, out, **settings)
    monkeypatch.undo()
    blocks = sorted(parts.glob("block-*.npz"))
    assert len(blocks) == 2 < json.loads((parts / "manifest.json").read_text())["blocks"]
    assert not out.exists()

    with pytest.raises(ConfigError) as error:
        scored(tiny_setup, out, **settings, max_len=256, template="zephyr")
    message = str(error.value)
    assert str(parts) in message and "(max_len, template differ)" in message and "--overwrite" in message
    assert sorted(parts.glob("block-*.npz")) == blocks  # the finished blocks are kept

    scored(tiny_setup, out, **settings, max_len=256, template="zephyr", overwrite=True)
    assert not parts.exists() and len(read_jsonl(out)) == 8
    entry = entry_of(out)
    assert (entry["max_len"], entry["template"], entry["insert_eos"]) == (256, "zephyr", True)


def test_scoring_never_modifies_its_input(tiny_setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_setup / "data", data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    scored(tiny_setup, data / "val_scored.jsonl", dataset=data)  # written beside its input
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name in before} == before
    assert sorted(p.name for p in data.iterdir()) == sorted([*before, "val_scored.jsonl",
                                                             "val_scored.jsonl.provenance.json"])  # no leftovers


# --- 4. the merge's coverage check ------------------------------------------------------------------------------

def test_merge_checks_that_every_kept_row_is_scored_once(tiny_setup, tok, tmp_path):
    raw = load_split(str(tiny_setup / "data"), "val")
    data = build_pairs(raw, tok, "tulu", MAX_LEN, None)
    kept = data.rows.tolist()
    dropped = sorted(set(range(len(raw))) - set(kept))
    assert kept and dropped
    half = len(kept) // 2

    def blocks(name: str, *row_lists) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for b, rows in enumerate(row_lists):
            rows = np.asarray(rows, dtype=np.int64)
            np.savez(folder / f"block-{b:06d}.npz", rows=rows, chosen=-1.0 - rows, rejected=-0.5 - rows)
        return folder

    chosen, rejected, coverage = merge_blocks(blocks("good", kept[half:], kept[:half]), 2, data, len(raw), 1)
    assert coverage == {"processes": 1, "rows_scored": len(kept), "duplicates": 0, "missing": 0, "unexpected": 0}
    assert chosen[kept].tolist() == [-1.0 - r for r in kept] and rejected[kept].tolist() == [-0.5 - r for r in kept]
    assert np.isnan(chosen[dropped]).all() and np.isnan(rejected[dropped]).all()

    for name, row_lists, problem in [
        ("twice", (kept[:half + 1], kept[half:]), "'duplicates': 1"),
        ("gap", (kept[:half], kept[half + 1:]), "'missing': 1"),
        ("dropped_row", (kept[:half], kept[half:] + dropped[:1]), "'unexpected': 1"),
    ]:
        folder = blocks(name, *row_lists)
        with pytest.raises(RefdpoError, match=re.escape(problem)) as error:
            merge_blocks(folder, 2, data, len(raw), 1)
        assert "coverage check failed" in str(error.value) and str(folder) in str(error.value)
        assert len(list(folder.glob("block-*.npz"))) == 2  # kept for inspection

    with pytest.raises(RefdpoError, match=re.escape("blocks [2] were never written")):
        merge_blocks(blocks("short", kept[:half], kept[half:]), 3, data, len(raw), 1)


def test_a_process_that_stopped_scoring_is_named_instead_of_waited_for(tmp_path):
    """Block b is process b % processes's; the main process waits for the others, but not for ever."""
    import time

    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text("{}")
    shards.save_block(parts / "block-000000.npz", np.array([0]), np.array([-1.0]), np.array([-2.0]))
    assert shards.wait_for_blocks(parts, 1, processes=2, poll_s=0.01, stall_s=60) is None  # all there
    shards.heartbeat(parts, 1)
    an_hour_ago = time.time() - 3600
    os.utime(parts / "alive-1", (an_hour_ago, an_hour_ago))
    with pytest.raises(RefdpoError, match=re.escape("process(es) 1 scored nothing for 1 min and blocks [1] are "
                                                    "missing; the blocks done are kept")):
        shards.wait_for_blocks(parts, 2, processes=2, poll_s=0.01, stall_s=60)
    shards.heartbeat(parts, 1)  # alive again: the main process goes on waiting, and sees the block arrive
    shards.save_block(parts / "block-000001.npz", np.array([1]), np.array([-1.0]), np.array([-2.0]))
    assert shards.wait_for_blocks(parts, 2, processes=2, poll_s=0.01, stall_s=60) is None


# --- 5. truncation policy ---------------------------------------------------------------------------------------

def test_pairs_truncated_away_are_dropped_and_counted(tiny_setup, tok, outputs, val_records, tmp_path):
    full = build_pairs(load_split(str(tiny_setup / "data"), "val"), tok, "tulu", 1 << 30, None)
    lost = [i for i in range(len(full)) if max(full.chosen[i].response_start,
                                               full.rejected[i].response_start) >= MAX_LEN]
    kept = [i for i in range(len(full)) if i not in lost]
    partial = [i for i in kept if max(full.chosen[i].full_length, full.rejected[i].full_length) > MAX_LEN]
    assert 0 < len(lost) < len(full) and partial

    out = tmp_path / "val.jsonl"
    summary = scored(tiny_setup, out, max_len=MAX_LEN)
    records = read_jsonl(out)
    assert [r["prompt_id"] for r in records] == [val_records[i]["prompt_id"] for i in kept]
    entry = entry_of(out)
    assert entry["dropped_truncated"] == summary["dropped_truncated"] == len(lost)
    assert (entry["rows_in"], entry["rows_out"]) == (64, len(records)) and len(records) == 64 - len(lost)
    assert entry["partially_truncated"] == len(partial) and entry["on_truncated"] == "drop"
    # no zero from a vanished response; a cut response has fewer (negative) terms than the whole one
    whole = {r["prompt_id"]: r for r in read_jsonl(outputs["jsonl"])}
    for r in records:
        assert r["chosen_logprob"] < 0 and r["rejected_logprob"] < 0
    for i in partial:
        cut, uncut = records[kept.index(i)], whole[val_records[i]["prompt_id"]]
        gains = [cut[c] - uncut[c] for c in COLUMNS]
        assert min(gains) > -1e-4 and max(gains) > 0


def test_on_truncated_error_names_file_row_and_field(tiny_setup, tok, tmp_path):
    full = build_pairs(load_split(str(tiny_setup / "data"), "val"), tok, "tulu", 1 << 30, None)
    lost = [i for i in range(len(full)) if full.chosen[i].response_start >= MAX_LEN]
    out = tmp_path / "val.jsonl"
    with pytest.raises(RefdpoError) as error:
        scored(tiny_setup, out, max_len=MAX_LEN, on_truncated="error")
    errors = error.value.errors if isinstance(error.value, DataErrors) else [error.value]
    first = errors[0]
    assert isinstance(first, DataError)
    source = str(tiny_setup / "data" / "val.jsonl")
    assert (first.source, first.row, first.line, first.field) == (source, lost[0], lost[0] + 1, "chosen")
    assert str(error.value).splitlines()[0].startswith(
        f"{source}: row {lost[0]} (line {lost[0] + 1}): field 'chosen': the response is truncated away by "
        f"max_len={MAX_LEN}")
    assert [e.row for e in errors] == lost[:len(errors)]
    assert not out.exists() and not (tmp_path / "val.jsonl.parts").exists()


# --- 6. bad input through the CLI -------------------------------------------------------------------------------

def _bad_dataset(folder: Path, val_records: list[dict], spoil) -> Path:
    rows = copy.deepcopy([r for r in val_records if len(r["chosen"]) == 2][:3])
    spoil(rows[1])
    return write_split(folder, rows)


def _spoil_last_role(record):
    record["chosen"][-1]["role"] = "user"


def _spoil_prompt(record):
    record["rejected"][0]["content"] += " Please."


def test_cli_malformed_chosen_is_one_line_and_exit_2(tiny_setup, val_records, tmp_path):
    data = _bad_dataset(tmp_path / "bad", val_records, _spoil_last_role)
    out = tmp_path / "out.jsonl"
    result = run_cli(["score", "--model", str(tiny_setup / "model"), "--dataset", str(data), "--out", str(out)],
                     timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"refdpo score: error: {data / 'train.jsonl'}: row 1 (line 2): field 'chosen[1].role': the last message "
        "must be from the assistant, got 'user'"]
    assert not out.exists()


def test_cli_prompts_that_differ_are_one_line(tiny_setup, val_records, tmp_path, capsys):
    data = _bad_dataset(tmp_path / "bad", val_records, _spoil_prompt)
    out = tmp_path / "out.jsonl"
    _, lines = run_main(["score", "--model", str(tiny_setup / "model"), "--dataset", str(data), "--out", str(out),
                         "--no-progress"], capsys)
    assert lines == [f"refdpo score: error: {data / 'train.jsonl'}: row 1 (line 2): field 'rejected[0].content': "
                     "differs from chosen's: chosen and rejected must share every message but the last"]
    assert not out.exists() and not (tmp_path / "out.jsonl.parts").exists()


@pytest.mark.parametrize("extra,message", [
    (["--out", "OUT", "--mode", "posterior"], "--mode must be one of conditional, prior"),
    ([], "--out is required (a .jsonl/.parquet/.csv file or a folder)"),
    (["--out", "OUT", "--prior_prefix", "nothing"], "--prior_prefix must be one of empty_user, assistant, bos"),
    (["--out", "OUT", "--batch_tokens", "-1"], "--batch_tokens must be >= 0 (0: by device)"),
    (["--out", "OUT", "--save_every", "0"], "--max_batch_pairs and --save_every must be >= 1"),
])
def test_cli_bad_settings_are_one_line(extra, message, tiny_setup, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["score", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"),
            *[str(out) if a == "OUT" else a for a in extra]]
    assert run_main(argv, capsys)[1] == [f"refdpo score: error: {message}"]
    assert not out.exists()


# --- 7. the shared-prompt layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_layout_equals_the_plain_one(attn, models, val_data, tok):
    model, pad = models[attn], pad_token_id(tok)
    assert model.config._attn_implementation == attn
    mask_dtype = modeling_mask_dtype(model)
    assert mask_dtype == (torch.bool if attn == "sdpa" else torch.float32)
    shared_rows = collate_packed(val_data, [0, 1], np.ones(2), pad, capacity=1, mask_dtype=mask_dtype)
    assert shared_rows["attention_mask"].dtype == mask_dtype
    assert all(shares_prompt(val_data, i) for i in range(len(val_data)))
    longest = sorted(range(len(val_data)), key=val_data.num_tokens)[-3:]
    for indices in (list(range(len(val_data))), [7], longest + [0]):
        shared = np.concatenate(score_batch(model, val_data, indices, True, pad))
        plain = np.concatenate(score_batch(model, val_data, indices, False, pad))
        np.testing.assert_allclose(shared, plain, rtol=0, atol=1e-5)
    expected = [oracle(model, val_data.chosen[7]), oracle(model, val_data.rejected[7])]
    np.testing.assert_allclose(np.concatenate(score_batch(model, val_data, [7], True, pad)), expected, atol=1e-4)


def mixed_pairs(val_data: PairData, n: int = 12) -> PairData:
    """The first n val pairs, where pairs 0 and 1 no longer tokenise their prompt identically on both sides:
    pair 0's rejected side comes from a conversation with another prompt, pair 1's lost its BOS."""
    chosen, rejected = list(val_data.chosen[:n]), list(val_data.rejected[:n])
    start = chosen[0].response_start
    other = next(j for j in range(n, len(val_data))
                 if not np.array_equal(val_data.chosen[j].input_ids[:start], chosen[0].input_ids[:start]))
    rejected[0] = val_data.rejected[other]
    e = rejected[1]
    rejected[1] = Encoded(e.input_ids[1:], e.response_start - 1, e.full_length - 1)
    return PairData(chosen, rejected, None, None, np.arange(n, dtype=np.int64), "mixed")


def test_pairs_whose_prompts_tokenise_differently_are_scored_unshared(models, val_data, tok):
    model, pad = models["sdpa"], pad_token_id(tok)
    data = mixed_pairs(val_data)
    assert [shares_prompt(data, i) for i in range(len(data))] == [False, False] + [True] * (len(data) - 2)
    assert decide_layout(model, data, pad) == (True, True)  # the others still share their prompt
    plan = plan_batches(data, 16384, 64, True)
    assert [(sorted(idx), shared) for idx, shared in plan] == [(list(range(2, len(data))), True), ([0, 1], False)]
    chosen, rejected = score_data(model, data, pad)
    expected_c = [oracle(model, e) for e in data.chosen]
    expected_r = [oracle(model, e) for e in data.rejected]
    np.testing.assert_allclose(chosen, expected_c, rtol=0, atol=1e-4)
    np.testing.assert_allclose(rejected, expected_r, rtol=0, atol=1e-4)
    plain = score_data(model, data, pad, share_prompt=False)
    np.testing.assert_allclose(np.concatenate([chosen, rejected]), np.concatenate(plain), rtol=0, atol=1e-5)


# --- 8. plan_batches --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_data(tiny_setup, tok) -> PairData:
    return build_pairs(load_split(str(tiny_setup / "data"), "train"), tok, "tulu", 512, None)


def _width(data: PairData, i: int, shared: bool) -> int:
    """A pair's row width as collated: padded to a multiple of 8."""
    c, r = len(data.chosen[i].input_ids), len(data.rejected[i].input_ids)
    width = c + r - data.chosen[i].response_start if shared else max(c, r)
    return -(-width // 8) * 8


def _check_plan(data: PairData, plan: list, batch_tokens: int, max_pairs: int, share: bool) -> None:
    assert plan == plan_batches(data, batch_tokens, max_pairs, share)  # a function of the data only
    assert json.dumps(plan) == json.dumps(plan_batches(data, batch_tokens, max_pairs, share))  # the manifest hash
    assert sorted(i for idx, _ in plan for i in idx) == list(range(len(data)))  # each pair exactly once
    flags = [shared for _, shared in plan]
    assert flags == sorted(flags, reverse=True)  # shared batches first
    for group in (True, False):
        batches = [idx for idx, shared in plan if shared == group]
        widths = [max(_width(data, i, group) for i in idx) for idx in batches]
        assert widths == sorted(widths, reverse=True)  # longest first
        for k, idx in enumerate(batches):
            assert all((share and shares_prompt(data, i)) == group for i in idx)
            assert 1 <= len(idx) <= max_pairs
            rows = 1 if group else 2
            assert rows * len(idx) * widths[k] <= batch_tokens or len(idx) == 1
            if k + 1 < len(batches):  # greedy: the next pair would not have fitted
                nxt = batches[k + 1][0]
                grown = rows * (len(idx) + 1) * max(widths[k], _width(data, nxt, group))
                assert len(idx) == max_pairs or grown > batch_tokens


@pytest.mark.parametrize("batch_tokens,max_pairs,share", [
    (16384, 64, True), (1024, 64, True), (1024, 64, False), (4096, 5, False), (4096, 5, True), (40, 64, True)])
def test_plan_batches(batch_tokens, max_pairs, share, train_data):
    plan = plan_batches(train_data, batch_tokens, max_pairs, share)
    _check_plan(train_data, plan, batch_tokens, max_pairs, share)
    if batch_tokens == 40:  # smaller than any pair: one pair per batch
        assert all(len(idx) == 1 for idx, _ in plan) and len(plan) == len(train_data)


def test_plan_batches_with_shared_and_unshared_pairs(val_data):
    data = mixed_pairs(val_data, n=40)
    for batch_tokens in (200, 1000):
        _check_plan(data, plan_batches(data, batch_tokens, 8, True), batch_tokens, 8, True)


# --- 9. check without a model -----------------------------------------------------------------------------------


# --- 10. provenance comparison -----------------------------------------------------------------------------------


