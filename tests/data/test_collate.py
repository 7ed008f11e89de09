"""Padding-free packing (collate_packed): every sequence's response log-prob and gradient is the one of its own
padded row, checked on a float64 model against the plain float64 computation and in float32; the start-up check
falls back to padding for a model whose attention would mix packed sequences.

Tolerance: Llama's RMSNorm computes in float32 even inside a float64 model, so two layouts of the same sequence
(other attention shapes, other summation order) agree to float32 rounding: about 1e-6 nats on sums of ~100."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refdpo.core.logprobs import reference_logprobs_float64, sequence_logprobs
from refdpo.data import build_pairs, collate_packed, collate_pairs, load_split
from refdpo.data.collate import pack_rows
from refdpo.tokenization import load_tokenizer

F64_TOL = 1e-5  # nats per sequence (see above)
GRAD_REL_TOL = 1e-5  # of the largest gradient entry
F32_TOL = 1e-5


@pytest.fixture(scope="module")
def pairs(tiny_setup):
    tok = load_tokenizer(str(tiny_setup / "model"))
    raw = load_split(str(tiny_setup / "data"), "val")
    return build_pairs(raw, tok, "tulu", 512, ("chosen_logprob", "rejected_logprob")), tok.pad_token_id


@pytest.fixture(scope="module")
def model(tiny_setup):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_setup / "model").eval()


def test_pack_rows_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2, 12]
    rows = pack_rows(lengths, 12)
    assert sorted(k for row in rows for k in row) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in row) <= 12 for row in rows)
    assert rows == [[5], [1, 2], [3, 0], [4]]  # 12 | 9+3 | 7+5 | 2: first fit, longest first
    assert pack_rows([20, 3], 10) == [[0], [1]]  # a sequence longer than the capacity gets its own row


LAYOUTS = {"sequences": None, "shared_prompts": torch.bool}


@pytest.mark.parametrize("capacity", [0, 1 << 30], ids=["rows_of_the_longest", "one_row"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_padded_in_float64(pairs, model, capacity, layout):
    import copy

    data, pad = pairs
    model64 = copy.deepcopy(model).double()
    idx, w = np.arange(6), np.ones(6)
    padded = collate_pairs(data, idx, w, pad)
    mask = LAYOUTS[layout] if LAYOUTS[layout] is None else torch.float64  # eager-style float mask for float64
    packed = collate_packed(data, idx, w, pad, capacity, mask_dtype=mask)
    if layout == "shared_prompts":  # each prompt once: fewer positions than the sequences' tokens
        assert packed["flat_index"].numel() == padded["lengths"].sub(padded["response_start"]).sum()
        assert (packed["position_ids"] >= 0).all() and packed["input_ids"].numel() < int(padded["num_tokens"])
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()
    assert int(packed["num_tokens"]) == int(padded["num_tokens"])
    with torch.no_grad():
        got = sequence_logprobs(model64, packed)[0]  # the fused head runs in the model dtype: float64
    want = reference_logprobs_float64(model64, padded)
    assert (got - want).abs().max().item() < F64_TOL
    assert torch.equal(sequence_logprobs(model64, packed)[1], sequence_logprobs(model64, padded)[1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_gradients_equal_padded(pairs, model, layout):
    import copy

    data, pad = pairs
    idx, w = np.arange(4), np.ones(4)
    grads = []
    mask = None if LAYOUTS[layout] is None else torch.float64
    for batch in (collate_pairs(data, idx, w, pad), collate_packed(data, idx, w, pad, mask_dtype=mask)):
        m = copy.deepcopy(model).double().train()
        logps = sequence_logprobs(m, batch, fused=True)[0]
        (logps[:4] - logps[4:]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    scale = grads[0].abs().max().item()
    assert (grads[0] - grads[1]).abs().max().item() <= GRAD_REL_TOL * max(1.0, scale)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_float32_fused_head(pairs, model, layout):
    data, pad = pairs
    idx, w = np.arange(8), np.ones(8)
    with torch.no_grad():
        a = sequence_logprobs(model, collate_pairs(data, idx, w, pad))[0]
        b = sequence_logprobs(model, collate_packed(data, idx, w, pad, mask_dtype=LAYOUTS[layout]))[0]
    assert (a - b).abs().max().item() < F32_TOL


def test_start_up_check_falls_back_when_attention_mixes_sequences(pairs, model, monkeypatch):
    import transformers.masking_utils as mu

    from refdpo.core.verify import packing_works

    data, pad = pairs
    cpu, sequences, shared = torch.device("cpu"), {"mask_dtype": None}, {"mask_dtype": torch.bool}
    assert packing_works(model, data, pad, cpu, True, sequences)[0]
    assert packing_works(model, data, pad, cpu, True, shared)[0]
    # A model that ignores the position-id restarts: packed sequences would attend to each other.
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    ok, diff = packing_works(model, data, pad, cpu, True, sequences)
    assert not ok and diff > 1e-2


def test_training_picks_the_shared_prompt_layout(pairs, model):
    from refdpo.core.verify import choose_collate

    data, pad = pairs
    chosen = choose_collate(model, data, pad, torch.device("cpu"), True)
    assert chosen.keywords["mask_dtype"] == torch.bool  # sdpa: each prompt once, a boolean mask
    assert choose_collate(model, data, pad, torch.device("cpu"), True, packing=False) is collate_pairs


def test_liger_without_the_package_is_a_clear_error(tiny_setup, tmp_path):
    import importlib.util

    from helpers import train_config

    from refdpo.commands.train import train
    from refdpo.errors import ConfigError

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ConfigError, match="liger-kernel"):
        train(train_config(tiny_setup, tmp_path / "run", liger=True, max_train_pairs=8))
