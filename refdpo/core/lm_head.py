"""The LM head, tiled: log_softmax(h @ W.T)[target] for the positions that predict a response token only.

Memory. Full logits for a DPO batch are [2B, T, V]: 4 x 2048 x 128k float32 is 4.2 GB, paid again for the
log-softmax and its gradient. Here only the positions that predict a response token go through the LM head,
in tiles of [rows, vocabulary columns]. Forward keeps each row's log-sum-exp (combined across column tiles)
and its target logit; backward recomputes each tile's logits instead of storing them. The peak is a tile or
two, and nothing of size [2B, T, V] is built. The tiles are small on CPU so that a tile stays in cache
through its softmax and both gradient matmuls (`tile_shape`).

How the head is reached. The model runs its own forward (so DDP, FSDP and DeepSpeed ZeRO-3 gather and release
parameters exactly as usual); for the duration of the call the output head's `forward` is redirected to the
tiled computation, which receives the final hidden states and the head's (gathered) weight. Architectures
that post-process logits after the head (Gemma soft-capping, Cohere/Granite/Falcon-H1 scaling) are handled;
`core.verify.head_matches_model` checks the redirected head against the model's own logits, and callers fall
back to the model's logits (`fused=False`) if they ever disagree.
"""

from __future__ import annotations

import contextlib
import math

import torch

CHUNK_ELEMENTS = 1 << 24  # logits per tile on GPU and per chunk of the fallback path: 64 MiB of float32


# On CPU a 2 MiB tile stays in L2 cache from its matmul through the softmax to the two backward matmuls; a
# 64 MiB chunk goes to memory and back between each (1.6x the full path's time at V=128k, against 1.1x).
CPU_TILE_ELEMENTS = 1 << 19


MIN_TILE_ROWS = 1024  # the rows are the inner dimension of the weight-gradient matmul: keep it large


def tile_shape(rows: int, vocab: int, device: torch.device, chunk_elements: int | None = None) -> tuple[int, int]:
    """(rows, columns) of the head's tiles of logits: about `chunk_elements` of them (default: 2^19 on CPU,
    2^24 elsewhere), square-ish but with at least MIN_TILE_ROWS rows when there are that many."""
    n = chunk_elements or (CPU_TILE_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS)
    r = max(1, min(rows, n, max(MIN_TILE_ROWS, math.isqrt(n))))
    return r, max(1, min(vocab, n // r))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _tiles(m: int, v: int, tile: tuple[int, int]):
    for r0 in range(0, m, tile[0]):
        for c0 in range(0, v, tile[1]):
            yield slice(r0, r0 + tile[0]), slice(c0, c0 + tile[1])


def _target_column(targets: torch.Tensor, cols: slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' target falls in the tile's columns, and its column there (clamped for the other rows): masks,
    not `nonzero`, so that a GPU never waits on the host."""
    local = targets - cols.start
    hit = (local >= 0) & (local < width)
    return hit, local.clamp(0, width - 1)[:, None]


class _ChunkedTargetLogprob(torch.autograd.Function):
    """log_softmax(y)[target] for y = softcap(scale * (h @ W.T + b)), tile by tile, recomputed in backward.

    Forward keeps only each row's log-sum-exp [M]; backward recomputes a tile's logits, turns them into its
    gradient in place and feeds both gradient matmuls before the next tile, so no [M, V] tensor ever exists."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tile, scale, softcap, dtype):
        w = weight.to(dtype)
        # Each column tile's log-sum-exp, combined once at the end: a running logaddexp adds rounding with
        # every tile (measured: 3.8e-6 nats per token after 50 tiles, against 1.2e-6 combined at the end).
        parts = torch.empty(hidden.shape[0], -(-weight.shape[0] // tile[1]), dtype=torch.float32,
                            device=hidden.device)
        target_logit = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for rows, cols in _tiles(hidden.shape[0], weight.shape[0], tile):
            y = _logits(hidden[rows], w[cols], None if bias is None else bias[cols], scale, softcap, dtype)
            parts[rows, cols.start // tile[1]] = torch.logsumexp(y, dim=1)
            hit, col = _target_column(targets[rows], cols, y.shape[1])
            target_logit[rows] = torch.where(hit, y.gather(1, col).squeeze(1), target_logit[rows])
            del y  # else the next tile's logits are built while this one's are still alive
        lse = torch.logsumexp(parts, dim=1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.tile, ctx.scale, ctx.softcap, ctx.dtype = tile, scale, softcap, dtype
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        scale, softcap, dtype = ctx.scale, ctx.softcap, ctx.dtype
        w = weight.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, **f32) if need_h else None
        grad_w = torch.zeros(weight.shape, **f32) if need_w else None
        grad_b = torch.zeros(weight.shape[0], **f32) if need_b else None
        grad_out = grad_out.float()
        for rows, cols in _tiles(hidden.shape[0], weight.shape[0], ctx.tile):
            h, g = hidden[rows], grad_out[rows]
            y = _logits(h, w[cols], None if bias is None else bias[cols], scale, softcap, dtype)  # [r, c] f32
            # y = c * tanh(z / c) has slope 1 - (y / c)^2.
            cap_slope = None if softcap is None else 1 - (y / softcap) ** 2
            # d log_softmax(y)[t] / dy = onehot(t) - softmax(y), built in place in the tile.
            grad_y = y.sub_(lse[rows, None]).exp_().mul_(-g[:, None])
            hit, col = _target_column(targets[rows], cols, y.shape[1])
            grad_y.scatter_add_(1, col, (g * hit)[:, None])
            if cap_slope is not None:
                grad_y.mul_(cap_slope)
            if scale != 1.0:
                grad_y.mul_(scale)
            if need_h:
                _add_matmul(grad_h[rows], grad_y, w[cols], dtype)
            if need_w:
                _add_matmul(grad_w[cols], grad_y.t(), h, dtype)
            if need_b:
                grad_b[cols] += grad_y.sum(0)
            del y, grad_y
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """out += a @ b, the product in `dtype` (the autocast one), accumulated in float32 `out`."""
    if dtype == torch.float32:
        out.addmm_(a, b.float())  # in place: no temporary of out's size
    else:
        out += (a.to(dtype) @ b.to(dtype)).float()


def _logits(h, w, bias, scale, softcap, dtype) -> torch.Tensor:
    with torch.autocast(h.device.type, enabled=False):
        z = (h.to(dtype) @ w.t()).float()
        if bias is not None:
            z += bias.float()
        if scale != 1.0:
            z *= scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
    return z


def chunked_target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                            chunk_elements: int | None = None, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-row log-prob of `targets` under logits softcap(scale * (hidden @ weight.T + bias)).

    hidden [M, H], weight [V, H], targets [M] -> float32 [M]. The matmul runs in the autocast dtype when
    autocast is on (as the model's own head would), the softmax in float32. The logits are computed in tiles
    of about `chunk_elements` (see `tile_shape`), or of exactly `tile` = (rows, columns) when given.
    """
    tile = tile or tile_shape(hidden.shape[0], weight.shape[0], hidden.device, chunk_elements)
    return _ChunkedTargetLogprob.apply(hidden, weight, bias, targets, tile, float(scale), softcap,
                                       _compute_dtype(hidden))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def head_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) that the architecture applies to the head's output before the softmax."""
    base = unwrap(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = 1.0
    logit_scale = getattr(base, "logit_scale", None)  # Cohere multiplies by it
    if isinstance(logit_scale, (int, float)):
        scale *= logit_scale
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides by it
    if isinstance(logits_scaling, (int, float)) and logits_scaling:
        scale /= logits_scaling
    multiplier = getattr(getattr(base, "model", None), "lm_head_multiplier", None)  # Falcon-H1
    if isinstance(multiplier, (int, float)):
        scale *= multiplier
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


@contextlib.contextmanager
def redirect_head(model: torch.nn.Module, compute):
    """Within the block, calling the output head runs `compute(head, hidden)`; its result is captured after
    every other forward hook (ZeRO-3 attaches its backward hooks there), so yield a dict to read it from."""
    head = unwrap(model).get_output_embeddings()
    captured: dict = {}
    own_forward = head.__dict__.get("forward")
    head.forward = lambda hidden: compute(head, hidden)
    handle = head.register_forward_hook(lambda module, args, output: captured.__setitem__("out", output))
    try:
        yield captured
    finally:
        handle.remove()
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward


def redirectable(model: torch.nn.Module) -> bool:
    head = unwrap(model).get_output_embeddings()
    # A plain Linear, also when FSDP2 has made its class a subclass (FSDPLinear); a LoRA or quantised head
    # computes more than weight @ h, which its own forward says.
    return isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
