"""`refdpo generate`: a checkpoint's answers to AlpacaEval's prompts (or any), in AlpacaEval's output format.

Greedy by default (the paper's setting), batched by prompt length with left padding, in the training chat
template. `--prompts alpaca_eval` loads the 805 prompts of `tatsu-lab/alpaca_eval` from the Hub; a .json or
.jsonl file of records with an `instruction` (and optionally `dataset`) works offline. Output: a JSON list of
{instruction, output, generator, dataset}, ready for `alpaca_eval`, plus `<out>.stats.json`.

Degeneration detector (the paper names no criterion; this one is documented and counted):
  no_eos      the model never produced its end token within max_new_tokens (it would have gone on);
  repetitive  more than `repeat_threshold` of the output's token n-grams (n = `repeat_ngram`) are repeats of
              an earlier n-gram in the same output (1 - distinct/total), over outputs of at least 2n tokens.
An output is degenerate when either holds. Over-optimised policies (too small a beta) typically fail both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refdpo.checkpoint import model_name, model_path
from refdpo.config import InferenceSpec, ModelSpec, check_all, option
from refdpo.console import progress_bar
from refdpo.data.templates import DEFAULT_TEMPLATE, TEMPLATES, adds_special_tokens, check_template, render
from refdpo.errors import DataError
from refdpo.io import atomic_write_json, require_writable
from refdpo.modeling import (
    default_device,
    inference_dtype,
    input_device,
    load_frozen,
    load_vllm,
    pad_token_id,
)
from refdpo.tokenization import load_tokenizer

log = logging.getLogger(__name__)
ALPACA_EVAL = "alpaca_eval"


@dataclass
class GenerateConfig(InferenceSpec, ModelSpec):
    prompts: str = option(ALPACA_EVAL, "alpaca_eval (805 prompts, tatsu-lab/alpaca_eval on the Hub) or a .json/"
                                       ".jsonl file of records with an 'instruction'")
    out: str = option("outputs.json", "where to write the outputs (AlpacaEval format)")
    template: str = option(DEFAULT_TEMPLATE, f"chat format the model was trained with: {' | '.join(TEMPLATES)}")
    generator: str = option("", "name recorded in each output (default: the run's name for a run folder or its "
                                "checkpoints, else the model path's last part)")
    max_new_tokens: int = option(2048, "tokens generated at most per prompt")
    batch_size: int = option(16, "prompts per generate call")
    do_sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(0.7, "sampling temperature (with --do_sample)")
    top_p: float = option(1.0, "nucleus sampling (with --do_sample)")
    max_prompts: int = option(0, "use only the first N prompts (0: all)")
    repeat_ngram: int = option(4, "n of the repeated-n-gram degeneration test")
    repeat_threshold: float = option(0.5, "share of repeated n-grams above which an output is repetitive")
    seed: int = option(0, "sampling seed")

    def validate(self) -> GenerateConfig:
        check_all([
            (self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}"),
            (min(self.max_new_tokens, self.batch_size, self.repeat_ngram) >= 1,
             "--max_new_tokens, --batch_size and --repeat_ngram must be >= 1"),
            (0 < self.repeat_threshold < 1, "--repeat_threshold must be in (0, 1)"),
            (self.max_prompts >= 0, "--max_prompts must be >= 0"),
        ] + self.inference_checks())
        return self


def _alpaca_eval_prompts() -> list[dict]:
    """The 805 prompts: the repo's `alpaca_eval.json`, else its `datasets` config (older layouts)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download("tatsu-lab/alpaca_eval", "alpaca_eval.json", repo_type="dataset")
        return json.loads(Path(path).read_text())
    except Exception as first:  # offline, or the file moved
        try:
            import datasets

            return datasets.load_dataset("tatsu-lab/alpaca_eval", "alpaca_eval", split="eval").to_list()
        except Exception:
            raise DataError("tatsu-lab/alpaca_eval", f"cannot load from the Hub ({type(first).__name__}); pass "
                                                     "the prompts as a local .json/.jsonl file with --prompts") from None


def load_prompts(source: str, limit: int = 0) -> list[dict]:
    """[{instruction, dataset}] from AlpacaEval on the Hub or a local .json/.jsonl file."""
    if source == ALPACA_EVAL:
        rows = _alpaca_eval_prompts()
    else:
        from refdpo.data.loading import load_jsonl

        path = Path(source)
        if not path.is_file():
            raise DataError(source, "no such prompts file (or use --prompts alpaca_eval)")
        raw = load_jsonl(path)
        rows = raw.records
        for row, record in enumerate(rows):
            if not isinstance(record.get("instruction"), str) or not record["instruction"].strip():
                raise DataError(source, "needs a non-empty string", row=row, field="instruction",
                                line=raw.line_of(row))
    rows = rows[:limit] if limit else rows
    default = ALPACA_EVAL if source == ALPACA_EVAL else Path(source).stem
    return [{"instruction": r["instruction"], "dataset": r.get("dataset", default)} for r in rows]


def repeated_ngram_share(tokens: list[int], n: int) -> float:
    """1 - distinct/total over the n-grams of `tokens` (0 when there are fewer than 2n tokens)."""
    if len(tokens) < 2 * n:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def _prompt_ids(instruction: str, template: str, tokenizer) -> list[int]:
    conversation = [{"role": "user", "content": instruction}, {"role": "assistant", "content": ""}]
    prompt, _ = render(conversation, template, tokenizer)
    return tokenizer(prompt, add_special_tokens=adds_special_tokens(template))["input_ids"]


def _end_tokens(model, tokenizer) -> list[int]:
    ends = model.generation_config.eos_token_id
    ends = [ends] if isinstance(ends, int) else list(ends or [])
    return sorted({*ends, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})


@torch.inference_mode()
def generate_outputs(model, tokenizer, prompts: list[dict], cfg: GenerateConfig) -> tuple[list[list[int]], list[bool]]:
    """(generated token ids without the end token, whether an end token was produced) per prompt, in order."""
    ids = [_prompt_ids(p["instruction"], cfg.template, tokenizer) for p in prompts]
    ends, pad_id = _end_tokens(model, tokenizer), pad_token_id(tokenizer)
    device = input_device(model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
    outputs: list[list[int]] = [[] for _ in ids]
    ended = [False] * len(ids)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {
        "do_sample": False}
    torch.manual_seed(cfg.seed)
    for lo in progress_bar(range(0, len(order), cfg.batch_size), desc="generate", dynamic_ncols=True):
        batch = order[lo:lo + cfg.batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        new = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=ends, pad_token_id=pad_id,
                             **sampling)[:, width:].tolist()
        for row, i in enumerate(batch):
            tokens = new[row]
            stop = next((k for k, t in enumerate(tokens) if t in ends), None)
            ended[i] = stop is not None
            outputs[i] = tokens[:stop] if stop is not None else tokens
    return outputs, ended


def _generate_vllm(tokenizer, prompts: list[dict], cfg: GenerateConfig) -> tuple[list[list[int]], list[bool]]:
    """The same prompts and stopping rule through vLLM (continuous batching; the package is optional)."""
    llm = load_vllm(cfg, seed=cfg.seed)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # vLLM also stops at the model's own end tokens (generation_config); these are stripped from the text too.
    ends = sorted({t for t in (llm.get_tokenizer().eos_token_id, tokenizer.eos_token_id) if t is not None})
    params = SamplingParams(max_tokens=cfg.max_new_tokens, stop_token_ids=ends,
                            temperature=cfg.temperature if cfg.do_sample else 0.0,
                            top_p=cfg.top_p if cfg.do_sample else 1.0)
    results = llm.generate([TokensPrompt(prompt_token_ids=_prompt_ids(p["instruction"], cfg.template, tokenizer))
                            for p in prompts], params)
    tokens = [[t for t in r.outputs[0].token_ids if t not in ends] for r in results]
    return tokens, [r.outputs[0].finish_reason == "stop" for r in results]


def generate(cfg: GenerateConfig) -> dict:
    """Generate, write the AlpacaEval JSON and its statistics; returns the statistics."""
    require_writable(Path(cfg.out).parent, "--out")  # before the model loads
    generator = cfg.generator or model_name(cfg.model)  # a run's name, not "best": runs must not collide
    cfg = dataclasses.replace(cfg, model=model_path(cfg.model))  # a run folder stands for its best checkpoint
    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    check_template(cfg.template, tokenizer)
    if cfg.backend == "vllm":
        tokens, ended = _generate_vllm(tokenizer, prompts, cfg)
    else:
        device = default_device()
        model = load_frozen(cfg, device, inference_dtype(cfg.dtype, device), cfg.device_map)
        tokens, ended = generate_outputs(model, tokenizer, prompts, cfg)
    records = [{"instruction": p["instruction"], "output": tokenizer.decode(t, skip_special_tokens=True).strip(),
                "generator": generator, "dataset": p["dataset"]} for p, t in zip(prompts, tokens)]
    out = Path(cfg.out)
    atomic_write_json(out, records)
    stats = degeneration_stats(tokens, ended, records, cfg)
    atomic_write_json(out.with_name(out.stem + ".stats.json"), stats)
    return stats


def degeneration_stats(tokens: list[list[int]], ended: list[bool], records: list[dict],
                       cfg: GenerateConfig) -> dict:
    """Length statistics and the degeneration detector's counts (module docstring), with flagged indices."""
    lengths = np.array([len(t) for t in tokens])
    repeats = [repeated_ngram_share(t, cfg.repeat_ngram) for t in tokens]
    no_eos = [i for i, e in enumerate(ended) if not e]
    repetitive = [i for i, r in enumerate(repeats) if r > cfg.repeat_threshold]
    degenerate = sorted(set(no_eos) | set(repetitive))
    n = len(tokens)
    return {
        "outputs": n, "generator": records[0]["generator"] if records else None,
        "length_tokens": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                          "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max())},
        "length_chars_mean": float(np.mean([len(r["output"]) for r in records])),
        "no_eos": len(no_eos), "repetitive": len(repetitive), "degenerate": len(degenerate),
        "degenerate_rate": len(degenerate) / n,
        "detector": {"max_new_tokens": cfg.max_new_tokens, "repeat_ngram": cfg.repeat_ngram,
                     "repeat_threshold": cfg.repeat_threshold},
        "flagged": {"no_eos": no_eos, "repetitive": repetitive},
    }


def summary_line(stats: dict) -> str:
    lt = stats["length_tokens"]
    return (f"{stats['outputs']} outputs: length mean {lt['mean']:.1f} tokens (median {lt['median']:.0f}, max "
            f"{lt['max']}); degenerate {stats['degenerate']} ({stats['degenerate_rate']:.1%}): no end token "
            f"{stats['no_eos']}, repetitive {stats['repetitive']}")
