"""The testbed's models: tiny `LlamaForCausalLM`s trained by supervised fine-tuning on demonstrations, sampled
with `generate`, and scored token by token with refdpo's own log-prob code.

Prompts and replies go through the same chat-template code as `refdpo score` and `refdpo train` (templates.py),
so what the SFT model learns is exactly what the preference data later calls x and y.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refdpo.core.logprobs import response_token_logprobs
from refdpo.data.templates import render, tokenize_rendered
from refdpo.testbed.task import conversation

TEMPLATE = "model"  # the tokenizer's own chat template (task.CHAT_TEMPLATE)


def new_model(tokenizer, seed: int, hidden: int = 64, layers: int = 2):
    """A random-init Llama: hidden 64, 2 layers, 4 heads, MLP 128, tied embeddings (~85k parameters)."""
    from refdpo.testbed.tiny import tiny_llama

    return tiny_llama(tokenizer, hidden=hidden, layers=layers, heads=4, kv_heads=4, seed=seed, max_positions=256)


def encode(tokenizer, keywords: Sequence[Sequence[str]], replies: Sequence[Sequence[str]]):
    """Token ids of prompt + reply + EOS and where each reply starts, as the templates render them."""
    rendered = [render(conversation(k, r), TEMPLATE, tokenizer) for k, r in zip(keywords, replies)]
    encoded, _ = tokenize_rendered([p for p, _ in rendered], [f for _, f in rendered], tokenizer, TEMPLATE, 10_000)
    return encoded


def _right_padded(encoded, pad_id: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(e.input_ids) for e in encoded])
    ids = torch.full((len(encoded), int(lengths.max())), pad_id, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, :len(e.input_ids)] = torch.from_numpy(e.input_ids)
    width = ids.shape[1]
    return {"input_ids": ids, "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
            "position_ids": torch.arange(width).expand(len(encoded), width).contiguous(),
            "response_start": torch.tensor([e.response_start for e in encoded]), "lengths": lengths}


def supervised_finetune(model, tokenizer, keywords: Sequence[Sequence[str]], replies: Sequence[Sequence[str]],
                        steps: int, batch_size: int, lr: float, seed: int, snapshot_at: Sequence[int] = (),
                        snapshot: Callable[[int], None] | None = None) -> list[float]:
    """Maximise log p(reply + EOS | prompt) on demonstrations (cross-entropy on reply tokens only), AdamW with
    a constant learning rate; returns the loss every 50 steps. After each step count in `snapshot_at`,
    `snapshot(steps done)` is called with the model in eval mode: with a constant rate, the model it sees is
    exactly the one a run of that many steps ends with (graded references from one trajectory)."""
    data = _right_padded(encode(tokenizer, keywords, replies), tokenizer.pad_token_id)
    labels = data["input_ids"].clone()
    width = labels.shape[1]
    positions = torch.arange(width)
    labels[(positions < data["response_start"][:, None]) | (positions >= data["lengths"][:, None])] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(len(labels), (batch_size,), generator=generator)
        width = int(data["lengths"][rows].max())
        loss = model(input_ids=data["input_ids"][rows, :width], attention_mask=data["attention_mask"][rows, :width],
                     labels=labels[rows, :width]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
        if step + 1 in snapshot_at and snapshot is not None:
            model.eval()
            snapshot(step + 1)
            model.train()
    model.eval()
    return losses


@dataclass
class Samples:
    """Replies generated for prompts: the words, whether each ended with EOS, and the token ids."""

    words: list[list[str]]
    ended: list[bool]
    batch: dict[str, torch.Tensor]  # prompt + reply (+ EOS), for scoring with sequence_logprobs

    def lengths(self) -> np.ndarray:
        return np.array([len(w) for w in self.words], dtype=np.float64)


@torch.no_grad()
def sample(model, tokenizer, keywords: Sequence[Sequence[str]], *, greedy: bool, max_tokens: int, seed: int,
           num_per_prompt: int = 1, batch_size: int = 1024) -> Samples:
    """Replies from `model` by ancestral sampling at temperature 1 (no top-k/top-p) or greedy decoding, at
    most `max_tokens` tokens. With `num_per_prompt` n, prompt i's replies are rows i*n .. i*n+n-1."""
    prompts = [render([{"role": "user", "content": " ".join(k)}, {"role": "assistant", "content": ""}],
                      TEMPLATE, tokenizer)[0] for k in keywords]
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    words, ended, rows = [], [], []
    for lo in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[lo:lo + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(**enc, do_sample=not greedy, temperature=None if greedy else 1.0, top_k=0 if not greedy
                             else None, top_p=None, max_new_tokens=max_tokens, num_return_sequences=num_per_prompt,
                             eos_token_id=eos, pad_token_id=pad)
        width = enc["input_ids"].shape[1]
        for seq, mask in zip(out, enc["attention_mask"].repeat_interleave(num_per_prompt, dim=0)):
            reply = seq[width:].tolist()
            stop = reply.index(eos) + 1 if eos in reply else len(reply)
            ended.append(eos in reply)
            words.append(tokenizer.decode(reply[:stop], skip_special_tokens=True).split())
            rows.append((seq[:width][mask.bool()], torch.tensor(reply[:stop], dtype=torch.long)))
    batch = _right_padded([_Row(torch.cat([p, r]).numpy(), len(p)) for p, r in rows], pad)
    return Samples(words, ended, batch)


@dataclass
class _Row:
    input_ids: np.ndarray
    response_start: int


@torch.no_grad()
def reply_token_logprobs(model, batch: dict[str, torch.Tensor], batch_size: int = 512) -> list[torch.Tensor]:
    """Per reply, the log-probs of its tokens (the EOS last when it ended), float32, via refdpo's log-prob code."""
    out = []
    for lo in range(0, len(batch["lengths"]), batch_size):
        part = {k: v[lo:lo + batch_size] for k, v in batch.items()}
        width = int(part["lengths"].max())
        part = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in part.items()}
        token_lp = response_token_logprobs(model, part["input_ids"], part["attention_mask"], part["position_ids"],
                                           part["response_start"], part["lengths"])
        for row, (start, length) in enumerate(zip(part["response_start"], part["lengths"])):
            out.append(token_lp[row, start - 1:length - 1])
    return out


def sequence_logprob_sums(model, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """log p(reply | prompt) per row, float64."""
    return np.array([lp.double().sum().item() for lp in reply_token_logprobs(model, batch)])


def encoded_batch(tokenizer, keywords: Sequence[Sequence[str]], replies: Sequence[Sequence[str]]) -> dict:
    """The right-padded batch of prompt + reply + EOS, for reply_token_logprobs."""
    return _right_padded(encode(tokenizer, keywords, replies), tokenizer.pad_token_id)
