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
_TOKENIZE_BATCH = 1024


@dataclass
class Encoded:
    """One tokenised conversation: ids (truncated to max_len) and the index of its first response token."""

    input_ids: np.ndarray  # int64 [L], L <= max_len
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


def _tulu(messages: Sequence[Mapping], eos: str, insert_eos: bool) -> tuple[str, str]:
    after_prompt_turn = eos if insert_eos else ""
    turns = []
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "assistant":
            turns.append(f"<|assistant|>\n{content}{eos}\n")
        else:
            turns.append(f"<|{message['role']}|>\n{content}{after_prompt_turn}\n")
    prompt = "".join(turns[:-1]) + "<|assistant|>\n"
    return prompt, "".join(turns).strip()


def _chat_template(messages: Sequence[Mapping], tokenizer) -> tuple[str, str]:
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False).rstrip()
    if not full.startswith(prompt):
        raise ValueError("the chat template's rendering of the prompt (with generation prompt) is not a "
                         "prefix of the rendered conversation; use --template tulu or zephyr")
    return prompt, full


def render(messages: Sequence[Mapping], template: str, tokenizer) -> tuple[str, str]:
    """(prompt_text, full_text) where full_text = prompt_text + final response + end token.
    Template "bos" (prior mode only) ignores every turn but the last: BOS + response + EOS."""
    if template == "model":
        return _chat_template(messages, tokenizer)
    if template == "bos":
        return tokenizer.bos_token, f"{tokenizer.bos_token}{messages[-1]['content'].strip()}{tokenizer.eos_token}"
    return _tulu(messages, tokenizer.eos_token, insert_eos=(template == "zephyr"))


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


def tokenize_rendered(prompts: Sequence[str], fulls: Sequence[str], tokenizer, template: str,
                      max_len: int) -> tuple[list[Encoded], int]:
    """Tokenise rendered conversations in batches; returns the encodings and the boundary-merge count."""
    special = adds_special_tokens(template)
    encoded, merges = [], 0
    for lo in range(0, len(fulls), _TOKENIZE_BATCH):
        hi = lo + _TOKENIZE_BATCH
        kwargs = dict(add_special_tokens=special, return_attention_mask=False, return_token_type_ids=False)
        full_ids = tokenizer(list(fulls[lo:hi]), **kwargs)["input_ids"]
        prompt_ids = tokenizer(list(prompts[lo:hi]), **kwargs)["input_ids"]
        for ids, p_ids in zip(full_ids, prompt_ids):
            start = len(p_ids)
            if ids[:start] != p_ids:
                start = _common_prefix(ids, p_ids)
                merges += 1
            encoded.append(Encoded(np.asarray(ids[:max_len], dtype=np.int64), start, len(ids)))
    return encoded, merges
