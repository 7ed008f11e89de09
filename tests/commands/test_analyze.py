"""`refdpo analyze tokens`: EOS pushed down ranks first; tables equal a float64 computation; plots exist."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from helpers import run_cli

from refdpo.commands.analyze import analyze_tokens, write_analysis
from refdpo.data import build_pairs, load_split
from refdpo.modeling import pad_token_id
from refdpo.tokenization import load_tokenizer


def _models(setup, dtype=torch.float32):
    """The reference, and a policy equal to it but for an output bias of -3 nats on EOS (in float `dtype`)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=dtype).eval()
    policy = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=dtype).eval()
    eos = load_tokenizer(str(setup / "model")).eos_token_id
    head = torch.nn.Linear(policy.lm_head.in_features, policy.lm_head.out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(policy.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = -3.0
    policy.lm_head = head
    return reference, policy


def test_eos_pushed_down_ranks_first_and_tables_match_float64(tiny_setup, tmp_path):
    tokenizer = load_tokenizer(str(tiny_setup / "model"))
    raw = load_split(str(tiny_setup / "data"), "val")
    raw.records = raw.records[:12]
    data = build_pairs(raw, tokenizer, "tulu", 512, None)
    reference, policy = _models(tiny_setup)
    result = analyze_tokens({"eos-down": policy, "same": reference}, reference, data, tokenizer,
                            pad_token_id(tokenizer), min_count=5, top_k=5, bins=20, batch_size=5)
    eos = tokenizer.eos_token_id
    assert result["top_tokens"][0] == eos  # the most down-weighted token
    assert result["end_tokens"] == 24  # every chosen and rejected reply ends with its EOS
    rows = {r["model"]: r for r in result["eos"]}
    assert rows["same"]["eos_value"] == pytest.approx(rows["reference"]["eos_value"], abs=1e-5)
    assert rows["eos-down"]["eos_value"] < rows["reference"]["eos_value"] - 2
    write_analysis(result, tmp_path / "out")

    # Float64, directly: per-position log-softmax of both models, differences averaged per token type.
    ref64, pol64 = _models(tiny_setup, torch.float64)
    sums, counts, eos_value = {}, {}, []
    for seq in data.chosen + data.rejected:
        ids = torch.from_numpy(seq.input_ids)[None]
        with torch.no_grad():
            lp_ref = torch.log_softmax(ref64(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            lp_pol = torch.log_softmax(pol64(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        for p in range(seq.response_start - 1, len(seq.input_ids) - 1):
            t = int(seq.input_ids[p + 1])
            sums[t] = sums.get(t, 0.0) + float(lp_pol[p] - lp_ref[p])
            counts[t] = counts.get(t, 0) + 1
        eos_value.append(float(lp_pol[-1]))
    table = {int(r["token_id"]): r for r in csv.DictReader((tmp_path / "out" / "tokens.csv").open())}
    assert set(table) == set(counts)
    for t in counts:
        assert int(table[t]["count"]) == counts[t]
        assert float(table[t]["mean_diff[eos-down]"]) == pytest.approx(sums[t] / counts[t], abs=1e-5)
    eos_csv = {r["model"]: r for r in csv.DictReader((tmp_path / "out" / "eos.csv").open())}
    assert float(eos_csv["eos-down"]["eos_value"]) == pytest.approx(np.mean(eos_value), abs=1e-5)

    for name in ("token_histogram.png", "top_tokens.png", "eos.png"):
        png = (tmp_path / "out" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a real figure, not an empty canvas
    fractions = [float(r["fraction[eos-down]"]) for r in csv.DictReader((tmp_path / "out" / "histogram.csv").open())]
    assert sum(fractions) == pytest.approx(1.0)


def test_analyze_cli(tiny_setup, tmp_path):
    done = run_cli(["analyze", "tokens", "--models", str(tiny_setup / "model"), "--reference",
                    str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"), "--max_len", "512",
                    "--max_pairs", "8", "--min_count", "3", "--out", str(tmp_path / "a")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "a" / "eos.png").exists() and "token types" in done.stdout
    bad = run_cli(["analyze", "--models", "x"])
    assert bad.returncode == 2 and "usage: refdpo analyze tokens" in bad.stderr


def test_analyze_refuses_a_policy_with_another_tokenizer(tiny_setup, tmp_path):
    from refdpo.testbed.tiny import corpus, synthetic_pairs, tiny_llama, train_tokenizer

    other_tok = train_tokenizer(corpus(synthetic_pairs(100, seed=5)), vocab_size=300)
    tiny_llama(other_tok, seed=1).save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    done = run_cli(["analyze", "tokens", "--models", str(tmp_path / "other"), "--reference",
                    str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"), "--out", str(tmp_path / "a")])
    assert done.returncode == 2 and "another tokenizer" in done.stderr
