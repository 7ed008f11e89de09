"""Chat formats: a conversation -> token ids and where its final assistant response starts.

Only the final assistant response and the end token after it count (the "response mask" is the contiguous
span `ids[response_start:]`): that is the quantity stored as `chosen_logprob`/`rejected_logprob`.

  tulu    RefDPO's format (from open-instruct): `<|user|>\\n{prompt}\\n<|assistant|>\\n{response}</s>`, system
          turns as `<|system|>\\n`, contents stripped, the whole text stripped, tokenised with the tokenizer's
          special tokens (BOS). Used with --template tulu for Tulu 2 models.
  zephyr  tulu with an EOS after every user/system turn: RefDPO's `--insert_eos`, used for Mistral/Zephyr.
  model   the tokenizer's own chat template; the response starts where the rendering of the conversation
          without its final reply (with the generation prompt) ends. Trailing whitespace after the end
          token is dropped so the span ends at the end-of-turn token.

Prior mode (`refdpo score --mode prior`) scores log p(y) with the prompt removed. What replaces the prompt is
a choice (the paper does not say which it used), recorded in the provenance:
  empty_user  the template with an empty user turn: `<|user|>\n<|assistant|>\n{y}</s>` for tulu (default)
  assistant   the template with no turn before the reply: `<|assistant|>\n{y}</s>` for tulu
  bos         no template at all: BOS, then y and EOS

The whole text is tokenised at once, exactly as the model sees it, and the response start is the length of
the tokenised prompt. If the tokenizer merges characters across that boundary (so the tokenised prompt is not
a prefix of the tokenised conversation), the response starts at the first differing token: the merged token
counts as response. Such conversations are counted (`boundary_merges`) and reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from refdpo.errors import ConfigError

TEMPLATES = ("tulu", "zephyr", "model")
DEFAULT_TEMPLATE = "tulu"  # RefDPO's format
UNBOUNDED = 1 << 30  # a max_len (or a packed row's capacity) that never binds
PRIOR_PREFIXES = ("empty_user", "assistant", "bos")
_TOKENIZE_BATCH = 4096  # texts per call: enough for the tokenizer's threads, small enough for a bar
_CHECK_TEXTS = 8  # texts each tokenisation checks the fast encoder on


@dataclass
class Encoded:
    """One tokenised conversation: ids (truncated to max_len) and the index of its first response token."""

    input_ids: np.ndarray  # int32 [L], L <= max_len (half the memory of int64; batches are int64)
    response_start: int
    full_length: int  # length before truncation

    @property
    def response_tokens(self) -> int:
        """How many response tokens survive truncation (0: the response was truncated away)."""
        return max(0, len(self.input_ids) - self.response_start)


def check_template(name: str, tokenizer) -> None:
    """Fail early, with the fix, when a template cannot work with this tokenizer."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name in ("tulu", "zephyr") and not tokenizer.eos_token:
        raise ConfigError(f"template {name!r} appends the EOS token, but the tokenizer has none")
    if name == "model" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template 'model' needs a tokenizer with a chat template; this one has none "
                          "(use --template tulu or zephyr)")


def _tulu_turns(messages: Sequence[Mapping], eos: str, insert_eos: bool) -> list[str]:
    after_prompt_turn = eos if insert_eos else ""
    turns = []
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "assistant":
            turns.append(f"<|assistant|>\n{content}{eos}\n")
        else:
            turns.append(f"<|{message['role']}|>\n{content}{after_prompt_turn}\n")
    return turns


def render_prompt(messages: Sequence[Mapping], template: str, tokenizer) -> str:
    """The text before the final response of `messages` (a whole conversation): every turn but the last, and
    the assistant header."""
    if template == "model":
        return tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    if template == "bos":
        return tokenizer.bos_token
    return "".join(_tulu_turns(messages[:-1], tokenizer.eos_token, template == "zephyr")) + "<|assistant|>\n"


def render_full(messages: Sequence[Mapping], template: str, tokenizer) -> str:
    """The whole conversation: the prompt text, the final response and its end token."""
    if template == "model":
        return tokenizer.apply_chat_template(list(messages), tokenize=False).rstrip()
    if template == "bos":
        return f"{tokenizer.bos_token}{messages[-1]['content'].strip()}{tokenizer.eos_token}"
    return "".join(_tulu_turns(messages, tokenizer.eos_token, template == "zephyr")).strip()


def render_batch(prompted: Sequence[Sequence[Mapping]], whole: Sequence[Sequence[Mapping]], template: str,
                 tokenizer) -> tuple[list[str], list[str]] | None:
    """[render_prompt(m) for m in prompted], [render_full(m) for m in whole]: the chat template applied to all in
    one call each (the same function, batched: a third of the per-call cost). None when a conversation has no
    prompt turn or the template fails: the caller then renders one by one, to name the row."""
    if template != "model":
        return ([render_prompt(m, template, tokenizer) for m in prompted],
                [render_full(m, template, tokenizer) for m in whole])
    if not prompted or not whole or any(len(m) < 2 for m in prompted):
        return None
    try:
        prompts = tokenizer.apply_chat_template([list(m[:-1]) for m in prompted], tokenize=False,
                                                add_generation_prompt=True)
        fulls = tokenizer.apply_chat_template([list(m) for m in whole], tokenize=False)
    except Exception:  # noqa: BLE001 (a template's own error: the caller finds the row)
        return None
    return prompts, [full.rstrip() for full in fulls]


def check_prefix(prompt: str, full: str) -> None:
    if not full.startswith(prompt):
        raise ValueError("the chat template's rendering of the prompt (with generation prompt) is not a "
                         "prefix of the rendered conversation; use --template tulu or zephyr")


def render(messages: Sequence[Mapping], template: str, tokenizer) -> tuple[str, str]:
    """(prompt_text, full_text) where full_text = prompt_text + final response + end token.
    Template "bos" (prior mode only) ignores every turn but the last: BOS + response + EOS."""
    prompt, full = render_prompt(messages, template, tokenizer), render_full(messages, template, tokenizer)
    check_prefix(prompt, full)
    return prompt, full


def prior_conversation(messages: Sequence[Mapping], prefix: str) -> list[Mapping]:
    """The conversation whose final reply, scored conditionally, gives the prior log p(reply) (see above)."""
    if prefix not in PRIOR_PREFIXES:
        raise ConfigError(f"unknown prior prefix {prefix!r}; choose one of {', '.join(PRIOR_PREFIXES)}")
    reply = messages[-1]
    return [{"role": "user", "content": ""}, reply] if prefix == "empty_user" else [reply]


def prior_template(template: str, prefix: str, tokenizer) -> str:
    """The template that renders prior conversations: the given one, or "bos" for the bare BOS prefix."""
    if prefix != "bos":
        return template
    if not tokenizer.bos_token or not tokenizer.eos_token:
        raise ConfigError("--prior_prefix bos needs a tokenizer with BOS and EOS tokens; use --prior_prefix "
                          "empty_user or assistant")
    return "bos"


def adds_special_tokens(template: str) -> bool:
    """tulu/zephyr text gets the tokenizer's BOS; a chat template (and "bos") writes its own special tokens."""
    return template not in ("model", "bos")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _backend_encoder(tokenizer, special: bool):
    """The Rust tokenizer's batch encoder without offsets (about twice as fast as `tokenizer(texts)`, which
    computes them), when it is the same computation: a fast tokenizer with no truncation or padding set.
    `tokenize_rendered` checks it against `tokenizer(texts)` on the first texts it sees."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding:
        return None
    return lambda texts: [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=special)]


def _reference_encoder(tokenizer, special: bool):
    kwargs = dict(add_special_tokens=special, return_attention_mask=False, return_token_type_ids=False)
    return lambda texts: tokenizer(list(texts), **kwargs)["input_ids"]


def encoder(tokenizer, template: str, sample: Sequence[str]):
    """texts -> token id lists, as `tokenizer(texts)` gives them (special tokens as the template needs): the
    fast backend encoder when it agrees with the tokenizer's own call on `sample`, else that call."""
    special = adds_special_tokens(template)
    reference = _reference_encoder(tokenizer, special)
    fast = _backend_encoder(tokenizer, special)
    if fast is not None and fast(sample[:_CHECK_TEXTS]) == reference(sample[:_CHECK_TEXTS]):
        return fast
    return reference


def tokenize_rendered(prompts: Sequence[str], fulls: Sequence[str], tokenizer, template: str,
                      max_len: int, prompt_of: Sequence[int] | None = None) -> tuple[list[Encoded], int]:
    """Tokenise rendered conversations; returns the encodings and the boundary-merge count. `prompt_of[i]`:
    the index of `fulls[i]`'s prompt in `prompts` (default i; a pair's two sequences share one prompt)."""
    prompt_of = range(len(fulls)) if prompt_of is None else prompt_of
    encode = encoder(tokenizer, template, fulls)
    prompt_ids = encode(prompts)
    encoded, merges = [], 0
    for lo in range(0, len(fulls), _TOKENIZE_BATCH):
        for k, ids in enumerate(encode(fulls[lo:lo + _TOKENIZE_BATCH]), start=lo):
            p_ids = prompt_ids[prompt_of[k]]
            start = len(p_ids)
            if ids[:start] != p_ids:
                start = _common_prefix(ids, p_ids)
                merges += 1
            encoded.append(Encoded(np.asarray(ids[:max_len], dtype=np.int32), start, len(ids)))
    return encoded, merges
