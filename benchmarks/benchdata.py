"""The benchmarks' synthetic RefDPO pairs: Zipf-distributed pseudo-words cut to target token counts under a
given tokenizer, so that every tool sees the same text and the same lengths (train_bench.py, score_bench.py)."""

from __future__ import annotations

import itertools
import random

PROMPT_TOKENS = (32, 128)  # the templated prompt, BOS and markers included
RESPONSE_TOKENS = (32, 256)  # the response, its end token included


def _lexicon(rng: random.Random, size: int = 6000) -> list[str]:
    """Pseudo-words (plus the testbed's real ones), Zipf-ranked: a vocabulary large enough for a ~16k BPE."""
    from refdpo.testbed.tiny import (  # lazily: train_bench imports torch only in its workers
        ADJECTIVES,
        TOPICS,
    )

    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
              "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    words = set(TOPICS + ADJECTIVES + ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "with"])
    while len(words) < size:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    ranked = sorted(words)
    rng.shuffle(ranked)
    return ranked


class TextMaker:
    """Sentences of Zipf-distributed words, cut to a target token count under a given tokenizer."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = _lexicon(self.rng)
        self.weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(self.words))]
        # What random.choices computes from `weights` on every call (the same draws, ~30x faster sentences).
        self.cum_weights = list(itertools.accumulate(self.weights))
        self._cost: dict[str, int] = {}
        self.tokenizer = None

    def sentence(self) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=self.rng.randint(4, 20))
        if len(words) > 8 and self.rng.random() < 0.4:
            words[self.rng.randrange(2, len(words) - 2)] += ","
        return " ".join(words).capitalize() + self.rng.choice([".", ".", ".", "?", "!"])

    def _tokens(self, word: str) -> int:
        # Byte-level pre-tokenisation splits at spaces, so " word" costs the same wherever it appears.
        if word not in self._cost:
            self._cost[word] = len(self.tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        return self._cost[word]

    def text(self, tokens: int) -> str:
        """About `tokens` tokens (exact up to the first word's missing leading space)."""
        out, total = [], 0
        while total < tokens:
            for word in self.sentence().split():
                out.append(word)
                total += self._tokens(word)
                if total >= tokens:
                    break
        text = " ".join(out)
        return text if text[-1] in ".?!" else text + "."


def make_records(maker: TextMaker, n: int, overhead: int) -> list[dict]:
    """`n` RefDPO records: one user turn shared by chosen and rejected, replies of independent lengths.
    `overhead`: the template's tokens around the user turn, so that the templated prompt hits its target."""
    from refdpo.testbed.tiny import TOPICS

    rng = maker.rng
    records = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        user = f"Tell me about {topic}. " + maker.text(rng.randint(*PROMPT_TOKENS) - overhead - 6)
        replies = [maker.text(rng.randint(*RESPONSE_TOKENS) - 1) for _ in range(2)]
        prompt = [{"role": "user", "content": user}]
        records.append({"prompt": user, "prompt_id": f"bench-{i}",
                        "chosen": prompt + [{"role": "assistant", "content": replies[0]}],
                        "rejected": prompt + [{"role": "assistant", "content": replies[1]}]})
    return records
