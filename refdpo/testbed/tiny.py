"""Tiny, offline building blocks: a tokenizer trained with `tokenizers`, a random-init `LlamaForCausalLM`, and a
synthetic preference dataset in the RefDPO schema whose preferences are learnable.

`build_tiny` writes a complete setup, the same shape as a real one (a model folder loadable with
`from_pretrained`, train/val JSON lines with `chosen_logprob`/`rejected_logprob`), so the real loading,
scoring and training code runs end to end on a CPU in seconds with nothing downloaded.

The synthetic task: a user asks about a topic (sometimes after a system turn, sometimes in a multi-turn
conversation). The chosen reply is on-topic, polite and closes helpfully; the rejected one is off-topic,
curt, or repeats itself. Those are consistent token-level differences, so DPO can learn them from a few
hundred pairs, and held-out pairs test that it did.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from refdpo.config import Config, check_all, option
from refdpo.data.templates import DEFAULT_TEMPLATE, TEMPLATES
from refdpo.errors import ConfigError
from refdpo.io import require_writable

TOPICS = ["cats", "rivers", "volcanoes", "bicycles", "gardens", "planets", "bridges", "forests", "oceans",
          "trains", "libraries", "mountains", "bees", "clocks", "kites", "deserts", "castles", "robots",
          "islands", "whales", "lanterns", "glaciers", "orchards", "comets"]
ADJECTIVES = ["quiet", "bright", "ancient", "useful", "curious", "gentle", "vast", "tiny", "colorful", "strong",
              "fast", "calm", "rare", "warm", "tall", "clever"]
QUESTIONS = ["Tell me about {t}.", "What do you know about {t}?", "Describe {t} briefly.",
             "Why do people like {t}?", "Give me a fact about {t}."]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and politely."]
# The chat template used by the `model` template in tests: ChatML-style, with its own end-of-turn token.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _good(rng: random.Random, topic: str) -> str:
    a, b = rng.sample(ADJECTIVES, 2)
    closing = rng.choice(["I hope this helps.", "Thank you for asking.", "Happy to help with more."])
    return f"Sure! {topic.capitalize()} are {a} and {b}. Many people find {topic} {rng.choice(ADJECTIVES)}. {closing}"


def _bad(rng: random.Random, topic: str) -> str:
    other = rng.choice([t for t in TOPICS if t != topic])
    kind = rng.randrange(3)
    if kind == 0:
        return f"{other.capitalize()} are {rng.choice(ADJECTIVES)}."
    if kind == 1:
        return rng.choice(["No.", "Ask someone else.", "I will not answer that."])
    return " ".join([topic] * rng.randint(3, 6))


def synthetic_pairs(n: int, seed: int = 0, flip: float = 0.1) -> list[dict]:
    """`n` preference records in the RefDPO schema (without reference log-probs). A fraction `flip` of the
    labels is swapped, as annotators disagree in real preference data, so accuracy cannot simply reach 1."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = [{"role": "user", "content": rng.choice(QUESTIONS).format(t=topic)}]
        shape = rng.random()
        if shape < 0.2:
            prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
        elif shape < 0.35:
            first = rng.choice(TOPICS)
            prompt = [{"role": "user", "content": rng.choice(QUESTIONS).format(t=first)},
                      {"role": "assistant", "content": _good(rng, first)}] + prompt
        good, bad = _good(rng, topic), _bad(rng, topic)
        if rng.random() < flip:
            good, bad = bad, good
        chosen = prompt + [{"role": "assistant", "content": good}]
        rejected = prompt + [{"role": "assistant", "content": bad}]
        records.append({"prompt": prompt[-1]["content"], "prompt_id": f"synthetic-{seed}-{i}",
                        "chosen": chosen, "rejected": rejected})
    return records


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, with BOS/EOS/PAD and ChatML markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=special[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def corpus(records: list[dict]) -> list[str]:
    """Texts to train the tokenizer on: every message, with the template markers."""
    texts = ["<|system|>\n<|user|>\n<|assistant|>\n"]
    for r in records:
        for side in ("chosen", "rejected"):
            texts.extend(m["content"] for m in r[side])
    return texts


def tiny_llama(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 0, vocab_size: int = 0, seed: int = 0, tie: bool = True,
               max_positions: int = 1024):
    """A random-init LlamaForCausalLM sized for the CPU (about 0.1M parameters at the defaults).

    `intermediate` 0 means 2 x hidden. `vocab_size` larger than the tokenizer adds embedding rows no token
    uses: a realistic LM-head cost for throughput checks at scale."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=max(len(tokenizer), vocab_size), hidden_size=hidden,
                         intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass
class TinyConfig(Config):
    """`refdpo tiny`: what to build (the model's size defaults to ~0.1M parameters)."""

    REQUIRED: ClassVar = {"out": "--out is required"}

    out: str = option("", "folder to create")
    train_pairs: int = option(1024, "training pairs")
    val_pairs: int = option(256, "validation pairs")
    seed: int = option(0, "random seed (pairs, tokenizer corpus, initialisation)")
    template: str = option(DEFAULT_TEMPLATE, f"chat format the pairs are scored in: {' | '.join(TEMPLATES)}")
    max_len: int = option(512, "tokens per sequence when scoring")
    overwrite: bool = option(False, "rebuild even if OUT is complete")
    hidden: int = option(64, "model width (--hidden 1024 --layers 24 --heads 16 --kv_heads 8 --intermediate 5504 "
                             "--vocab_size 32000: ~0.5B parameters)")
    layers: int = option(2, "decoder layers")
    heads: int = option(4, "attention heads")
    kv_heads: int = option(2, "key/value heads")
    intermediate: int = option(0, "MLP width (0: 2 x hidden)")
    vocab_size: int = option(0, "embedding rows (0: the tokenizer's size)")

    def validate(self) -> TinyConfig:
        check_all([(self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}"),
                   (min(self.train_pairs, self.val_pairs, self.max_len, self.hidden, self.layers) >= 1,
                    "--train_pairs, --val_pairs, --max_len, --hidden and --layers must be >= 1")])
        return self

    @property
    def model_size(self) -> dict:
        return dict(hidden=self.hidden, layers=self.layers, heads=self.heads, kv_heads=self.kv_heads,
                    intermediate=self.intermediate, vocab_size=self.vocab_size)


def build_tiny(out: str | Path, **settings) -> Path:
    """Write out/model (tokenizer + random-init tiny Llama) and out/data/{train,val}.jsonl scored by that
    model as its own reference with `refdpo score` (so with provenance); `settings`: TinyConfig's fields.
    `tiny.json`, written last, marks the folder complete; an incomplete one is rebuilt."""
    from refdpo.commands.score import ScoreConfig, score
    from refdpo.io import write_jsonl
    from refdpo.tokenization import save_tokenizer

    cfg = TinyConfig(out=str(out), **settings).validate()
    require_writable(out, "--out")
    train_pairs, val_pairs, seed, template, max_len = cfg.train_pairs, cfg.val_pairs, cfg.seed, cfg.template, \
        cfg.max_len
    out = Path(out)
    wanted = {"train_pairs": train_pairs, "val_pairs": val_pairs, "seed": seed, "template": template,
              "max_len": max_len, "model_size": cfg.model_size}
    if (out / "tiny.json").exists() and not cfg.overwrite:
        built = json.loads((out / "tiny.json").read_text())
        changed = [f"--{k} {built.get(k)} (now {v})" for k, v in wanted.items()
                   if k != "model_size" and built.get(k) != v]
        if built.get("model_size") != cfg.model_size:
            changed.append("another model size")
        if changed:
            raise ConfigError(f"{out} holds a tiny setup built with {', '.join(changed)}: pass --overwrite to "
                              "rebuild it, or another --out")
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "raw").mkdir(parents=True)

    splits = {"train": synthetic_pairs(train_pairs, seed), "val": synthetic_pairs(val_pairs, seed + 10_000)}
    tokenizer = train_tokenizer(corpus(splits["train"]))
    model = tiny_llama(tokenizer, seed=seed, **cfg.model_size)
    model.save_pretrained(tmp / "model")
    save_tokenizer(tokenizer, tmp / "model")
    for name, records in splits.items():
        write_jsonl(tmp / "raw" / f"{name}.jsonl", records)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for name in splits:
        score(ScoreConfig(model=str(out / "model"), dataset=str(out / "raw"), split=name,
                          out=str(out / "data" / f"{name}.jsonl"), template=template, max_len=max_len,
                          progress=False).validate())
    shutil.rmtree(out / "raw")
    (out / "tiny.json").write_text(json.dumps({**wanted, "parameters": sum(p.numel() for p in model.parameters()),
                                               "reference": "model (the initial policy)"}, indent=2))
    return out
