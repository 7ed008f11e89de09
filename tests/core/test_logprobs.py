"""Numerics of refdpo.core.logprobs: response log-probs against a plain float64 computation, chunking, the chunked
head's gradients, padding invariance, response-only masking, architectures that post-process their logits,
bf16 autocast, and the memory property (no [N, T, V]-sized tensor is saved for backward on the fused path).

Every model is a tiny random-init one built from its config (nothing is downloaded), seeded.

Tolerances are module constants below (absolute, in nats, unless said otherwise); "float64" always means the
plain computation on a float64 deep copy of the model (`reference_logprobs_float64`).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from refdpo.core import lm_head as head
from refdpo.core import logprobs as lp
from refdpo.core.lm_head import chunked_target_logprobs, head_transform
from refdpo.core.logprobs import (
    prediction_mask,
    reference_logprobs_float64,
    response_token_logprobs,
    sequence_logprobs,
)
from refdpo.core.verify import head_matches_model

SEQ_TOL_F64 = 1e-4  # nats per sequence vs float64 (the acceptance criterion)
TOKEN_TOL_F64 = 1e-5  # nats per token vs float64
SAME_COMPUTE_TOL = 1e-5  # nats: the same float32 computation under another chunking / padding / batch order
GRAD_REL_TOL = 1e-5  # max |grad - grad_f64| / max |grad_f64| for the chunked head
MODEL_GRAD_REL_TOL = 1e-5  # fused vs own-logits parameter gradients, relative to the largest gradient
ARCH_TOL = 1e-4  # nats per sequence: fused head vs the architecture's own (post-processed) logits
PAD_TOL = 1e-6  # nats: tokens beyond `lengths` must not matter at all
BF16_REL_TOL = 2e-2  # |fused - own| / |own| per sequence under bf16 autocast

VOCAB = 5000
KEYS = ("input_ids", "attention_mask", "position_ids", "response_start", "lengths")


def llama(vocab: int = VOCAB, tie: bool = False, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def make_batch(lengths, starts, vocab: int = VOCAB, width: int | None = None, seed: int = 0, pad_id: int = 0):
    """A right-padded batch shaped like `refdpo.data.collate_pairs` output (random ids, pad ids beyond lengths)."""
    lengths = torch.tensor(lengths, dtype=torch.long)
    starts = torch.tensor(starts, dtype=torch.long)
    n, width = len(lengths), width or int(lengths.max())
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (n, width), generator=gen)
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    input_ids[attention_mask == 0] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": torch.arange(width).expand(n, width).contiguous(),
            "response_start": starts, "lengths": lengths}


def token_lps(model, batch, fused=True, chunk_elements=None):
    return response_token_logprobs(model, *(batch[k] for k in KEYS), fused=fused, chunk_elements=chunk_elements)


def reference_token_lps_float64(model64, batch):
    """[N, T] float64 per-token reference, aligned like response_token_logprobs (position p predicts p+1), built
    without `prediction_mask` (which `reference_logprobs_float64` shares with the code under test)."""
    with torch.no_grad():
        logits = model64(**{k: batch[k] for k in KEYS[:3]}, use_cache=False).logits.double()
    logp = F.log_softmax(logits, dim=-1)
    out = torch.zeros(logits.shape[:2], dtype=torch.float64)
    for row, (start, length) in enumerate(zip(batch["response_start"].tolist(), batch["lengths"].tolist())):
        for tok in range(max(start, 1), length):  # every response token, predicted from position tok - 1
            out[row, tok - 1] = logp[row, tok - 1, batch["input_ids"][row, tok]]
    return out


# Four sequences of different lengths (up to 300 tokens) and response starts, padded to a multiple of 8.
LENGTHS, STARTS = [300, 257, 131, 64], [5, 100, 60, 1]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama_pair(request):
    model = llama(tie=request.param)
    return model, copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def batch():
    return make_batch(LENGTHS, STARTS, width=304, seed=1)


# ---------------------------------------------------------------------------------------------- 1. float64


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own_logits"])
def test_token_logprobs_match_float64(llama_pair, batch, fused):
    model, model64 = llama_pair
    with torch.no_grad():
        tokens = token_lps(model, batch, fused=fused)
    assert tokens.dtype == torch.float32 and tokens.shape == batch["input_ids"].shape
    ref_tokens = reference_token_lps_float64(model64, batch)
    # Per token: <= TOKEN_TOL_F64 nats from the float64 computation (including which positions are scored).
    assert (tokens.double() - ref_tokens).abs().max().item() <= TOKEN_TOL_F64
    # Per sequence, the float32 token log-probs summed in float64: <= SEQ_TOL_F64 nats from the float64 reference.
    ref = reference_logprobs_float64(model64, batch)
    assert torch.allclose(ref, ref_tokens.sum(1), rtol=0, atol=1e-9)  # the two float64 references agree
    assert (tokens.double().sum(1) - ref).abs().max().item() <= SEQ_TOL_F64


def test_sequence_logprobs_match_float64_long_responses():
    """The acceptance criterion on `sequence_logprobs` itself, for twelve 300-token responses (|log p| ~ 2550,
    where float32 spacing is 2.4e-4: the sums must be float64 to hold 1e-4)."""
    model = llama(seed=19)
    batch = make_batch([300] * 12, [1] * 12, width=300, seed=20)
    ref = reference_logprobs_float64(copy.deepcopy(model).double(), batch)
    with torch.no_grad():
        errors = [(sequence_logprobs(model, batch, fused=fused)[0].double() - ref).abs().max().item()
                  for fused in (True, False)]
    assert max(errors) <= SEQ_TOL_F64  # SEQ_TOL_F64 nats per sequence, both paths


def test_sequence_logprobs_match_float64(llama_pair, batch):
    """`sequence_logprobs` itself on responses whose |log p| stays under 1024 nats (float32 spacing <= 6.1e-5)."""
    model, model64 = llama_pair
    short = {k: v[:, :100] if v.dim() == 2 else v for k, v in batch.items()}
    short["lengths"] = batch["lengths"].clamp(max=100)
    ref = reference_logprobs_float64(model64, short)
    assert ref.abs().max().item() < 1024
    for fused in (True, False):
        with torch.no_grad():
            sums, counts = sequence_logprobs(model, short, fused=fused)
        assert sums.dtype == torch.float64  # float32 token log-probs, summed in float64
        assert counts.tolist() == [95, 0, 40, 63]
        assert (sums.double() - ref).abs().max().item() <= SEQ_TOL_F64  # SEQ_TOL_F64 nats per sequence


# ---------------------------------------------------------------------------------------------- 2. chunking


@pytest.mark.parametrize("rows", [1, 7])
def test_tiny_chunks_equal_default(llama_pair, batch, rows):
    model, _ = llama_pair
    vocab = model.config.vocab_size
    with torch.no_grad():
        for fused in (True, False):
            default = token_lps(model, batch, fused=fused)
            chunked = token_lps(model, batch, fused=fused, chunk_elements=rows * vocab + vocab // 2)
            # SAME_COMPUTE_TOL nats per token (float32 spacing at ~8.5 nats is 9.5e-7); SEQ_TOL_F64 nats per
            # float64-accumulated sequence (the last-bit differences of up to ~300 tokens add up to ~1e-5).
            assert (chunked - default).abs().max().item() <= SAME_COMPUTE_TOL
            assert (chunked.double().sum(1) - default.double().sum(1)).abs().max().item() <= SEQ_TOL_F64


def test_chunk_rows():  # the fallback path (the model's own logits) chunks whole rows
    assert lp._chunk_rows(5000, 1) == 1  # never zero rows
    assert lp._chunk_rows(5000, 3 * 5000 + 4999) == 3
    assert lp._chunk_rows(1 << 16, None) == lp.CHUNK_ELEMENTS >> 16


def test_tile_shape():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert head.tile_shape(1024, 131072, cpu) == (1024, 512)  # 2 MiB tiles on CPU, 1024 rows when there are
    assert head.tile_shape(5000, 131072, cpu) == (1024, 512)
    assert head.tile_shape(300, 131072, cpu) == (300, (1 << 19) // 300)  # fewer rows: wider tiles
    assert head.tile_shape(300, 5000, cpu) == (300, 1747)
    assert head.tile_shape(10, 100, cpu) == (10, 100)  # never wider than the vocabulary
    assert head.tile_shape(16384, 131072, cuda) == (4096, 4096)  # 64 MiB square tiles elsewhere
    assert head.tile_shape(37, 97, cpu, chunk_elements=5) == (5, 1)  # never zero, never more than asked
    assert head.tile_shape(37, 97, cpu, chunk_elements=5 * 97) == (37, 13)


# ---------------------------------------------------------------------------------------------- 3. head grads


def _plain_head_f64(hidden, weight, bias, targets, scale, softcap):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.log_softmax(z, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("chunk_elements", [5 * 97, 5], ids=["37x13_tiles", "5x1_tiles"])  # both ragged
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (0.5, None), (1.0, 30.0), (2.0, 5.0)])
def test_chunked_head_grads_match_float64_autograd(scale, softcap, with_bias, chunk_elements):
    torch.manual_seed(3)
    m, h, v = 37, 16, 97
    hidden = torch.randn(m, h)
    weight = torch.randn(v, h) * (3 / h ** 0.5)  # logits of std ~3 (x scale): the soft-cap is active
    bias = torch.randn(v) if with_bias else None
    targets = torch.randint(0, v, (m,))
    g = torch.randn(m)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    out = chunked_target_logprobs(leaves[0], leaves[1], targets, leaves[2] if with_bias else None, scale=scale,
                                  softcap=softcap, chunk_elements=chunk_elements)
    assert out.dtype == torch.float32
    out.backward(g)

    leaves64 = [t.double().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    ref = _plain_head_f64(leaves64[0], leaves64[1], leaves64[2] if with_bias else None, targets, scale, softcap)
    ref.backward(g.double())

    assert _rel_err(out.detach(), ref.detach()) <= GRAD_REL_TOL  # values, relative to the largest |log p|
    for name, got, want in zip(["hidden", "weight", "bias"], leaves, leaves64):
        assert got.grad is not None and got.grad.dtype == torch.float32, name
        assert _rel_err(got.grad, want.grad) <= GRAD_REL_TOL, name  # GRAD_REL_TOL relative error


def test_chunked_head_only_needed_grads():
    torch.manual_seed(4)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen head
    chunked_target_logprobs(hidden, weight, torch.randint(0, 11, (6,)), chunk_elements=22).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_chunked_head_gradcheck_float64():
    """torch.autograd.gradcheck on a tiny float64 instance.

    `_compute_dtype` follows the input dtype (float64) when autocast is off, but `_logits` casts the logits to
    float32 (`.float()`) and the output is float32 by design, so finite differences are taken with eps=1e-3
    and compared at 1e-3 (at the default eps=1e-6 float32 rounding would dominate the numerical Jacobian)."""
    torch.manual_seed(5)
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3])
    assert head._compute_dtype(hidden) == torch.float64

    def fn(h, w, b):
        return chunked_target_logprobs(h, w, targets, b, scale=2.0, softcap=5.0, chunk_elements=14)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- 4. model grads


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_grads_fused_equal_own_logits(tie):
    model = llama(vocab=1000, tie=tie, seed=6)
    batch = make_batch([96, 80, 41, 17], [3, 50, 20, 1], vocab=1000, seed=7)
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        sequence_logprobs(model, batch, fused=fused, chunk_elements=1000 * 13)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    fused_grads, own_grads = grads
    assert fused_grads.keys() == own_grads.keys() == {n for n, _ in model.named_parameters()}
    scale = max(g.abs().max().item() for g in own_grads.values())
    for name, g in own_grads.items():
        # MODEL_GRAD_REL_TOL relative to the largest gradient entry.
        assert (fused_grads[name] - g).abs().max().item() <= MODEL_GRAD_REL_TOL * scale, name
    head_weight = model.get_output_embeddings().weight
    assert head_weight.grad is not None and head_weight.grad.abs().max().item() > 0  # the head gets a gradient


# ---------------------------------------------------------------------------------------------- 5. padding


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own_logits"])
def test_padding_invariance(llama_pair, batch, fused):
    model, _ = llama_pair
    with torch.no_grad():
        together = token_lps(model, batch, fused=fused)
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["lengths"][row])
            alone = make_batch([n], [int(batch["response_start"][row])], width=n)  # no padding at all
            alone["input_ids"][0] = batch["input_ids"][row, :n]
            tokens = token_lps(model, alone, fused=fused)
            # SAME_COMPUTE_TOL nats per token; a (float64-accumulated) sequence sums n such roundings, which
            # add like a random walk (measured: 1.05e-5 nats over one row's tokens with transformers 5.24).
            assert (tokens[0] - together[row, :n]).abs().max().item() <= SAME_COMPUTE_TOL
            assert abs(tokens.double().sum().item() - together[row].double().sum().item()) \
                <= SAME_COMPUTE_TOL * math.sqrt(n)
            assert together[row, n:].abs().max().item() == 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own_logits"])
def test_batch_order_invariance(llama_pair, batch, fused):
    model, _ = llama_pair
    perm = torch.tensor([2, 0, 3, 1])
    permuted = {k: v[perm] for k, v in batch.items()}
    with torch.no_grad():
        base = token_lps(model, batch, fused=fused)
        other = token_lps(model, permuted, fused=fused)
    assert (other - base[perm]).abs().max().item() <= SAME_COMPUTE_TOL  # SAME_COMPUTE_TOL nats per token


# ---------------------------------------------------------------------------------------------- 6. masking


def test_prediction_mask_positions():
    mask = prediction_mask(torch.tensor([3, 1, 5]), torch.tensor([6, 4, 5]), 8)
    assert mask.tolist() == [
        [False, False, True, True, True, False, False, False],  # predicts tokens 3, 4, 5
        [True, True, True, False, False, False, False, False],  # predicts tokens 1, 2, 3
        [False] * 8,  # empty response
    ]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own_logits"])
def test_response_only_masking(fused):
    model = llama(vocab=1000, seed=8)
    batch = make_batch([40, 33, 25], [12, 20, 25], vocab=1000, width=48, seed=9)  # last row: empty response
    with torch.no_grad():
        base = token_lps(model, batch, fused=fused)
        sums, counts = sequence_logprobs(model, batch, fused=fused)
    mask = prediction_mask(batch["response_start"], batch["lengths"], 48)
    assert base[~mask].abs().max().item() == 0 and base[mask].lt(0).all()
    assert (sums.double() - base.double().sum(1)).abs().max().item() <= SEQ_TOL_F64 and sums[2].item() == 0
    assert counts.tolist() == [28, 13, 0]

    # Padding ids beyond `lengths` (attention-masked) change nothing: within PAD_TOL nats per token.
    repadded = {k: v.clone() for k, v in batch.items()}
    gen = torch.Generator().manual_seed(10)
    pad = repadded["attention_mask"] == 0
    repadded["input_ids"][pad] = torch.randint(3, 1000, (int(pad.sum()),), generator=gen)
    with torch.no_grad():
        assert (token_lps(model, repadded, fused=fused) - base).abs().max().item() <= PAD_TOL

    # The prompt is context: changing prompt tokens (first token, last prompt token) changes the response
    # log-prob, by much more than any tolerance here.
    for pos in (0, 11):
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][0, pos] = (changed["input_ids"][0, pos] + 1) % 1000
        with torch.no_grad():
            new = token_lps(model, changed, fused=fused)
        assert abs(new[0].sum().item() - base[0].sum().item()) > 1e-3, pos
        assert torch.equal(new[1:], base[1:])  # the other rows are untouched


# ---------------------------------------------------------------------------------------------- 7. architectures


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                          sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                          max_position_embeddings=256, attn_implementation="eager")
    return Gemma2ForCausalLM(config), (1.0, 30.0)


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.0625,
                          max_position_embeddings=256)
    return CohereForCausalLM(config), (0.0625, None)


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
                           max_position_embeddings=256, tie_word_embeddings=False)
    return GraniteForCausalLM(config), (0.25, None)


POST_PROCESSED = [_gemma2, _cohere, _granite]


def test_at_least_one_post_processing_architecture_builds():
    """An architecture this transformers cannot build is skipped below; not all of them, or the soft-cap and
    logit-scale handling would go untested without a word."""
    built = []
    for build in POST_PROCESSED:
        try:
            build()
            built.append(build.__name__[1:])
        except Exception:  # what builds is the question
            continue
    assert built, "none of Gemma2, Cohere and Granite builds with this transformers"


@pytest.mark.parametrize("build", POST_PROCESSED, ids=["gemma2", "cohere", "granite"])
def test_post_processed_logits(build, monkeypatch):
    torch.manual_seed(11)
    try:
        model, expected = build()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"{build.__name__[1:]} cannot be built offline with this transformers: {exc!r}")
    model.eval()
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear
    with torch.no_grad():  # large logits, so that the scale / soft-cap visibly matter
        head.weight.mul_(40 / head.weight.abs().max())
    scale, softcap = head_transform(model)
    assert scale == pytest.approx(expected[0], rel=1e-12) and softcap == expected[1]

    batch = make_batch([64, 50, 23], [4, 30, 1], vocab=512, seed=12)
    with torch.no_grad():
        fused = sequence_logprobs(model, batch, fused=True)[0]
        own = sequence_logprobs(model, batch, fused=False)[0]
    assert (fused - own).abs().max().item() <= ARCH_TOL  # ARCH_TOL nats per sequence
    ok, diff = head_matches_model(model, batch)
    assert ok and diff <= ARCH_TOL

    # The check can fail: a head that ignores the architecture's transform is off by far more and detected.
    monkeypatch.setattr(lp, "head_transform", lambda model: (1.0, None))
    with torch.no_grad():
        wrong = sequence_logprobs(model, batch, fused=True)[0]
    assert (wrong - own).abs().max().item() > 1.0
    assert head_matches_model(model, batch)[0] is False


def test_head_matches_model_plain_llama():
    model = llama(vocab=1000, seed=13)
    assert head_transform(model) == (1.0, None)
    ok, diff = head_matches_model(model, make_batch([30, 17], [5, 9], vocab=1000, seed=14))
    assert ok and diff <= ARCH_TOL
    assert model.training is False  # restored


# ---------------------------------------------------------------------------------------------- 8. bf16 autocast


def test_bf16_autocast_fused_matches_own_logits():
    model = llama(vocab=2000, seed=15)
    batch = make_batch([128, 96, 40], [10, 50, 1], vocab=2000, seed=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head._compute_dtype(torch.zeros(1)) == torch.bfloat16
        fused, _ = sequence_logprobs(model, batch, fused=True)
        own, _ = sequence_logprobs(model, batch, fused=False)
        tokens = token_lps(model, batch, fused=True)
    assert tokens.dtype == torch.float32 and {fused.dtype, own.dtype} <= {torch.float32, torch.float64}
    # BF16_REL_TOL relative to each sequence's log-prob.
    assert ((fused - own).abs() / own.abs()).max().item() <= BF16_REL_TOL
    with torch.no_grad():
        exact, _ = sequence_logprobs(model, batch, fused=True)
    assert ((fused - exact).abs() / exact.abs()).max().item() <= BF16_REL_TOL  # and near the fp32 value
    fused.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- 9. memory


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


def _logits_sized(shapes, n, t, v):
    return [s for s in shapes if v in s and torch.Size(s).numel() >= n * t * v / 2]


def test_fused_path_saves_no_full_logits():
    n, t, v = 4, 64, 5000
    model = llama(vocab=v, seed=17)
    model.train()
    batch = make_batch([64, 60, 41, 33], [1, 20, 10, 30], seed=18)
    assert model.lm_head.weight.numel() < n * t * v / 2  # so the head weight itself is not mistaken for logits

    shapes, (sums, _) = _saved_shapes(lambda: sequence_logprobs(model, batch, fused=True))
    assert shapes and sums.requires_grad
    assert any(v in s for s in shapes)  # the head weight [V, H] is saved: the hook does see the head
    assert _logits_sized(shapes, n, t, v) == []  # no [N, T, V]-sized tensor kept for backward
    sums.sum().backward()  # and backward works from what was saved
    assert model.lm_head.weight.grad is not None

    # Positive control for the detector: a naive log_softmax over full logits does save one.
    def naive():
        logits = model(**{k: batch[k] for k in KEYS[:3]}, use_cache=False).logits
        return F.log_softmax(logits.float(), dim=-1)

    naive_shapes, _ = _saved_shapes(naive)
    assert _logits_sized(naive_shapes, n, t, v)

    # For contrast only (not asserted): the own-logits path, where the model builds [N, T, V] logits.
    own_shapes, _ = _saved_shapes(lambda: sequence_logprobs(model, batch, fused=False))
    print("own-logits path, [N, T, V]-sized saved tensors:", _logits_sized(own_shapes, n, t, v))


# ------------------------------------------------------------------- 10. architectures the head cannot serve


def test_a_model_that_never_calls_its_head_falls_back_to_its_own_logits():
    """A forward computing logits without calling `get_output_embeddings()` (as some custom code does): the
    redirection is never reached, so the start-up probe reports it and the model's own logits are used."""
    from refdpo.core.verify import head_matches_model

    model = llama(seed=3)

    class OwnHead(type(model)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kw):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=use_cache).last_hidden_state
            return type("Out", (), {"logits": torch.nn.functional.linear(hidden, self.lm_head.weight)})()

    model.__class__ = OwnHead
    batch = make_batch([40, 30], [10, 5], seed=4)
    with pytest.raises(RuntimeError, match="never called its output embeddings"), torch.no_grad():
        sequence_logprobs(model, batch, fused=True)
    ok, diff = head_matches_model(model, batch)
    assert not ok and diff == float("inf")
    with torch.no_grad():
        ref = reference_logprobs_float64(copy.deepcopy(model).double(), batch)
        assert (sequence_logprobs(model, batch, fused=False)[0] - ref).abs().max().item() <= SEQ_TOL_F64
