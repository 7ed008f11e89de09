"""The testbed's task: a synthetic instruction with a known reward r*(x, y) (design and reasons: README.md).

A prompt asks for three topic keywords; a reply is a sequence of words. The reward pays for covering the
keywords and, up to a cap, for distinct "filler" words (detail), and charges for off-topic keywords, repeats,
every word past a length budget and a reply that never ends. Demonstrations come in two qualities; preference
labels are Bradley-Terry draws on r*. Everything here is plain Python on words: it does not know which
tokenizer a model uses, so every model, whatever its vocabulary, is judged the same way.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

KEYWORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "candle", "garden", "bridge", "forest",
            "rocket", "island", "violin", "desert", "castle", "comet", "meadow", "harbor", "lantern", "glacier",
            "orchard", "falcon", "canyon", "engine", "mirror", "pepper", "saddle", "temple", "tunnel", "valley",
            "wagon", "anchor", "basket", "cactus", "dragon", "feather", "helmet", "jungle", "kettle", "ladder",
            "magnet", "needle", "oyster", "parrot", "quartz", "rabbit", "statue", "turtle")
FILLERS = ("very", "quite", "truly", "rather", "simply", "really", "also", "often", "always", "gently",
           "softly", "bright", "calm", "clear", "deep", "fresh", "gold", "green", "kind", "light", "proud",
           "quick", "rich", "sharp", "smooth", "still", "sweet", "tall", "warm", "wild", "wise", "young")
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "sep": "<sep>"}
KEYWORDS_PER_PROMPT = 3
# The prompt and the reply as the chat template renders them: BOS, the keywords, SEP, then the reply and EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} <sep>"
                 "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


@dataclass(frozen=True)
class Reward:
    """r*(x, y) = keywords covered + filler_value x min(distinct fillers, filler_cap)
                  - 0.5 x (off-topic or unknown words) - 0.5 x repeated words
                  - over_budget x max(0, len(y) - length_budget) - no_eos x [reply never ended]"""

    filler_value: float = 0.3
    filler_cap: int = 6
    length_budget: int = 12
    over_budget: float = 0.3
    off_topic: float = 0.5
    repeat: float = 0.5
    no_eos: float = 2.0

    def __call__(self, keywords: Sequence[str], words: Sequence[str], ended: bool) -> float:
        wanted = set(keywords)
        fillers = {w for w in words if w in _FILLER_SET}
        stray = sum(1 for w in words if w not in wanted and w not in _FILLER_SET)
        return (len(wanted.intersection(words)) + self.filler_value * min(len(fillers), self.filler_cap)
                - self.off_topic * stray - self.repeat * (len(words) - len(set(words)))
                - self.over_budget * max(0, len(words) - self.length_budget) - self.no_eos * (not ended))


_FILLER_SET = frozenset(FILLERS)


@dataclass(frozen=True)
class Variant:
    """A parameter set of the task: the reward, how many fillers demonstrations carry, the generation cap and
    the token budget of a pair. `base` is the demo's task; `long` has replies about three times longer (the
    paper's replies are long: short replies saturate beta x (log-prob margin) early)."""

    name: str
    reward: Reward
    good_fillers: tuple[int, int]  # distinct fillers in a good demonstration (inclusive range)
    mediocre_fillers: tuple[int, int]  # fillers in a mediocre demonstration
    max_reply_tokens: int  # a reply still going after this many tokens never ended
    max_len: int  # tokens of prompt + reply + EOS, with the incompatible tokenizer's two pieces per word
    sft_scale: int = 1  # SFT steps x this: in long replies the 3 keywords are sparse, and copying them takes
    #                     longer to learn (measured: after 400 steps the long SFT covered 0.3 of 3, after 1200 1.5)


VARIANTS = {
    "base": Variant("base", Reward(), (3, 6), (0, 3), 40, 128),
    "long": Variant("long", Reward(filler_cap=20, length_budget=32), (12, 20), (0, 10), 100, 256, sft_scale=3),
}


def prompts(n_train: int, n_heldout: int, rng: random.Random) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Keyword triples for training and held-out prompts; no held-out triple (as a set) occurs in training."""
    combos = list(itertools.combinations(KEYWORDS, KEYWORDS_PER_PROMPT))
    picked = rng.sample(combos, n_train + n_heldout)
    shuffled = [tuple(rng.sample(c, len(c))) for c in picked]
    return shuffled[:n_train], shuffled[n_train:]


def prompt_text(keywords: Sequence[str]) -> str:
    return " ".join(keywords)


def demonstration(keywords: Sequence[str], rng: random.Random, quality: str, dialect: bool = False,
                  variant: Variant | None = None) -> list[str]:
    """A reply written by a demonstrator (filler counts: the variant's; base shown).

    good      every keyword and 3-6 distinct fillers, interleaved (r* 3.9-4.8, 6-9 words)
    mediocre  1-3 keywords, 0-3 fillers, and with probability 0.3 a repeat or an off-topic keyword
    dialect   (good replies in another style, for the incompatible reference) fillers from the first half of
              the list only (at most 16), all of them before the keywords
    """
    variant = variant or VARIANTS["base"]
    if quality == "good":
        pool = FILLERS[:16] if dialect else FILLERS
        fillers = rng.sample(pool, min(len(pool), rng.randint(*variant.good_fillers)))
        if dialect:
            return fillers + list(keywords)
        words = list(keywords) + fillers
        rng.shuffle(words)
        return words
    words = rng.sample(list(keywords), rng.randint(1, 3)) + rng.sample(FILLERS, rng.randint(*variant.mediocre_fillers))
    if rng.random() < 0.3:
        words.append(rng.choice(words) if words and rng.random() < 0.5 else
                     rng.choice([k for k in KEYWORDS if k not in keywords]))
    rng.shuffle(words)
    return words


def bradley_terry(r1: float, r2: float, temperature: float, rng: random.Random) -> bool:
    """True when the first reply is preferred: P = sigmoid((r1 - r2) / temperature)."""
    return rng.random() < 1.0 / (1.0 + math.exp(-(r1 - r2) / temperature))


def conversation(keywords: Sequence[str], reply: Sequence[str]) -> list[dict]:
    return [{"role": "user", "content": prompt_text(keywords)}, {"role": "assistant", "content": " ".join(reply)}]


def preference_records(keywords: list[tuple[str, ...]], samples: list[tuple[list[str], bool, list[str], bool]],
                       reward: Reward, temperature: float, rng: random.Random, tag: str) -> tuple[list[dict], dict]:
    """RefDPO-schema records from two sampled replies per prompt, labelled by Bradley-Terry on r*.

    `samples[i]` is (words_1, ended_1, words_2, ended_2). Pairs of identical replies carry no preference and
    are dropped. Returns the records (each with its true rewards, for the report) and label statistics."""
    records, longer, agree = [], 0, 0
    for i, (kw, (w1, e1, w2, e2)) in enumerate(zip(keywords, samples)):
        if w1 == w2 and e1 == e2:
            continue
        r1, r2 = reward(kw, w1, e1), reward(kw, w2, e2)
        first = bradley_terry(r1, r2, temperature, rng)
        (cw, ce, cr), (lw, le, lr) = ((w1, e1, r1), (w2, e2, r2)) if first else ((w2, e2, r2), (w1, e1, r1))
        longer += len(cw) > len(lw)
        agree += cr > lr
        records.append({"prompt": prompt_text(kw), "prompt_id": f"{tag}-{i}",
                        "chosen": conversation(kw, cw), "rejected": conversation(kw, lw),
                        "chosen_true_reward": cr, "rejected_true_reward": lr,
                        "chosen_ended": ce, "rejected_ended": le})
    n = max(1, len(records))
    return records, {"pairs": len(records), "dropped_identical": len(keywords) - len(records),
                     "chosen_longer": longer / n, "chosen_higher_true_reward": agree / n}


def word_tokenizer():
    """The policy's tokenizer: one token per word (WordLevel), specials BOS/EOS/SEP/PAD, the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["sep"],
                                             "<unk>", *KEYWORDS, *FILLERS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tok)


def subword_tokenizer():
    """The incompatible reference's tokenizer: WordPiece where every word is two pieces, its first half and
    the rest ("lantern" -> "lan", "##tern"), so the token-level action space differs from the policy's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["sep"], "<unk>"]
    for word in (*KEYWORDS, *FILLERS):
        half = (len(word) + 1) // 2
        pieces += [p for p in (word[:half], "##" + word[half:]) if p not in pieces]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tokenizer = _wrap(tok)
    text = " ".join((*KEYWORDS, *FILLERS))
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text, "pieces do not round-trip"
    return tokenizer


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                        pad_token=SPECIAL["pad"], unk_token="<unk>",
                                        additional_special_tokens=[SPECIAL["sep"]])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- the demo's run families and references (testbed/demo.py runs them, testbed/report.py tabulates) ---

FAMILIES = {  # run family -> (label, training fields)
    "dpo": ("DPO, SFT as reference", {"ref_columns": "chosen_logprob,rejected_logprob"}),
    "ref_free": ("reference-free (posterior)", {"ref_free": True}),
    "prior": ("prior as reference (likelihood)", {"ref_columns": "prior_chosen_logprob,prior_rejected_logprob"}),
    "compatible": ("DPO, stronger compatible reference",
                   {"ref_columns": "compatible_chosen_logprob,compatible_rejected_logprob"}),
    "incompatible": ("DPO, stronger incompatible reference",
                     {"ref_columns": "incompatible_chosen_logprob,incompatible_rejected_logprob"}),
}
REFERENCES = {  # reference -> (model folder in the seed folder, columns, mode)
    "self": ("sft", "chosen_logprob,rejected_logprob", "conditional"),
    "compatible": ("compatible", "compatible_chosen_logprob,compatible_rejected_logprob", "conditional"),
    "incompatible": ("incompatible", "incompatible_chosen_logprob,incompatible_rejected_logprob", "conditional"),
    "prior": ("sft", "prior_chosen_logprob,prior_rejected_logprob", "prior"),
}
