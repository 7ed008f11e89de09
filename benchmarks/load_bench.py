"""Data loading throughput: reading, validating and tokenising a preference split, refdpo vs TRL's DPOTrainer.

What is measured: the wall time from a JSON-lines file on disk to a tokenised split in memory, for a 60k-pair
UltraFeedback-shaped synthetic split (one user turn of ~150 tokens, two replies of ~300 tokens), by two tools
on the same file, in the same benchmark run, each call in a fresh subprocess (nothing warm in memory):

  refdpo  `refdpo.data.load_pairs(spec, "train", tokenizer, ref_columns)` with `spec` a DataSpec(dataset=<the file>,
          template="model", max_len=2048, on_truncated="drop", cache_dir=<a folder>): reading the JSON
          lines, validating every record, rendering with the tokenizer's chat template, tokenising. The timed
          span ends when the PairData is returned. Tokenizer: `refdpo.tokenization.load_tokenizer(folder)`.
  trl     `datasets.load_dataset("json", data_files=<the file>, split="train", cache_dir=<a folder>)`, then TRL's
          own preparation, `trl.DPOTrainer._prepare_dataset(self, dataset, tokenizer, DPOConfig(max_length=2048,
          dataset_num_proc=N, use_cpu=True, report_to="none"), "train")` called unbound on a stand-in `self` (the method reads only
          `self._tokenizer`, and only for non-conversational data): prompt extraction when the prompt is not
          apart, `apply_chat_template` per example, the common-prefix split into prompt/chosen/rejected ids and
          the filter of over-long prompts, each a `Dataset.map`/`filter` that writes Arrow cache files. Tokenizer:
          `AutoTokenizer.from_pretrained(folder)`. Measured with dataset_num_proc None (in-process) and 2
          (`--trl-num-proc`); TRL's figure is the faster of them, and the JSON says which.

Each tool runs twice: "first" with an empty cache folder, "second" with the same folder again (datasets reuses
its Arrow files when the fingerprints match; refdpo reads the split back from its disk cache of tokenised splits,
refdpo/data/cache.py, where its `cache_dir` points: "cache files" in the table counts what each wrote). Time excludes imports
and the tokenizer's loading, both reported separately. pairs/s = pairs in the split / seconds; tokens/s = the
tokens the tool produced (prompt + reply of chosen and of rejected, the prompt counted twice, as each tool
counts them) / seconds. Per run also: CPU seconds of the process and its workers, peak RSS of the process
(VmHWM; workers not included), cache files written, and the share of the cores other processes kept busy (the
machine may be shared; each run first waits for quiet, up to --idle-wait s).

The split (`--format trl`, the default) is TRL's conversational format with the prompt apart: {"prompt_id",
"prompt": [user P], "chosen": [assistant C], "rejected": [assistant R], "ref_chosen_logps",
"ref_rejected_logps"}; `--format messages` writes refdpo's own (chosen/rejected as the whole conversation [user
P, assistant C], chosen_logprob/rejected_logprob). Text: pseudo-words from benchdata.TextMaker, composed from a
pool of sentences whose token counts were measured once, drawn at random until the target count (prompts
uniform in 50..250, replies in 100..500 content tokens) is reached; every prompt and reply text is distinct
(tokenizers cache words and pre-tokens: repeated texts would flatter every tool). The split is generated once
per (tokenizer, pairs, seed, format) into --workdir (default benchmarks/.cache/load_bench, ignored by git) and
reused; the realised token counts of a sample are checked against the planned ones (JSON: "data").

Equivalence: for --sample pairs spread over the split, TRL's prompt_ids + chosen_ids (and + rejected_ids) must
equal refdpo's chosen (rejected) input_ids and its response start must equal len(prompt_ids). The count that
agree is reported, and every disagreement is classified (see `classify`). Known, structural: zephyr's chat
template (Mistral's folder) writes "\\n" after every turn's EOS; TRL tokenises the rendering as it is, so its
completion ends with `</s>` `▁` `<0x0A>`, while refdpo strips whitespace after the end token so the response
ends at the EOS (what RefDPO scored): two more tokens per sequence for TRL, counted in its own tokens/s. (The
two tools also load Mistral's tokenizer differently: refdpo uses tokenizer.json as written, transformers 5
rebuilds it from the sentencepiece model and differs on a leading space; no text here starts with one.) With
Llama-3's folder the ids are identical.

Tokenizers (`--tokenizer`): Mistral-7B's (sentencepiece, zephyr chat template; the default) or Llama-3's, both
built offline from pinned PyPI files by tests/real_vocab.py (cached in .cache/test-vocab).

Run (from the repository root):
    .venv/bin/python benchmarks/load_bench.py [--pairs 60000] [--tokenizer mistral|llama3] [--format trl|messages]
        [--repeat 1] [--tools refdpo,trl] [--trl-num-proc none,2] [--workdir DIR]
    e.g. a quick look: .venv/bin/python benchmarks/load_bench.py --pairs 2000 --format messages --out /tmp/lb.json
Results: a table on stdout and JSON in benchmarks/results/load_bench_<tokenizer>.json (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

# Offline before anything imports huggingface_hub/datasets.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from benchdata import TextMaker  # noqa: E402 (its own folder)
from benchutil import cpu_busy_s, cpu_name, reset_peak_rss, status_kb, trl_version, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # real_vocab: the real tokenizers, from pinned PyPI files

from refdpo.io import atomic_folder, atomic_write_json, write_jsonl  # noqa: E402

TOKENIZERS = {"mistral": "mistral_folder", "llama3": "llama3_folder"}  # tests/real_vocab.py's builders
FORMATS = ("trl", "messages")
REF_COLUMNS = {"trl": "ref_chosen_logps,ref_rejected_logps", "messages": "chosen_logprob,rejected_logprob"}
PROMPT_TOKENS = (50, 250)  # content tokens of the user turn (mean 150)
REPLY_TOKENS = (100, 500)  # content tokens of each reply (mean 300)
SENTENCE_POOL = 50_000
REALISED_SAMPLE = 1000  # pairs whose texts are re-tokenised to check the planned token counts
DATA_VERSION = 1  # bump when the generated text changes, so cached splits are rebuilt
MAX_LEN = 2048
TOOLS = ("refdpo", "trl")
RUNS = ("first", "second")
RESULT_TAG = "LOAD_BENCH_RESULT "


# ------------------------------------------------------------------------------------------ tokenizer and data

def tokenizer_folder(name: str, workdir: Path) -> Path:
    """The tokenizer folder, built once into workdir/tokenizers (Llama-3's conversion takes ~40 s)."""
    import real_vocab

    folder = workdir / "tokenizers" / name
    if not (folder / "tokenizer_config.json").is_file():
        with atomic_folder(folder) as tmp:
            getattr(real_vocab, TOKENIZERS[name])(tmp)
    return folder


def sentence_pool(maker: TextMaker, tokenizer, n: int) -> tuple[list[str], list[int]]:
    """`n` sentences and their token counts (alone, no special tokens), measured in one batched call."""
    sentences = [maker.sentence() for _ in range(n)]
    ids = tokenizer(sentences, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return sentences, [len(i) for i in ids]


def compose(rng: random.Random, pool: list[str], counts: list[int], target: int) -> tuple[str, int]:
    """Sentences drawn at random until their token counts reach `target` (stopping short where that is closer).
    Returns the text and its planned token count (the sum; the realised count differs by boundary effects)."""
    parts, total = [], 0
    while total < target:
        i = rng.randrange(len(pool))
        if parts and total + counts[i] - target > target - total:
            break
        parts.append(pool[i])
        total += counts[i]
    return " ".join(parts), total


def make_split(args: argparse.Namespace, folder: Path) -> tuple[Path, dict]:
    """The split as JSON lines in the workdir (generated once, then reused) and what it holds."""
    stem = f"{args.tokenizer}-{args.pairs}-seed{args.seed}-v{DATA_VERSION}-{args.format}"
    path, meta_path = args.workdir / "data" / f"{stem}.jsonl", args.workdir / "data" / f"{stem}.meta.json"
    if path.is_file() and meta_path.is_file():
        return path, json.loads(meta_path.read_text())
    from refdpo.tokenization import load_tokenizer

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(folder))
    maker = TextMaker(args.seed)
    pool, counts = sentence_pool(maker, tokenizer, SENTENCE_POOL)
    rng = random.Random(args.seed + 1)
    seen: set[bytes] = set()
    texts, planned, redrawn = [], [], 0  # per pair: (prompt, chosen, rejected) and their planned counts

    def distinct(bounds: tuple[int, int]) -> tuple[str, int]:
        nonlocal redrawn
        while True:
            text, count = compose(rng, pool, counts, rng.randint(*bounds))
            key = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                return text, count
            redrawn += 1

    for _ in range(args.pairs):
        drawn = [distinct(PROMPT_TOKENS), distinct(REPLY_TOKENS), distinct(REPLY_TOKENS)]
        texts.append([t for t, _ in drawn])
        planned.append([c for _, c in drawn])
    records = []
    for i, (p, c, r) in enumerate(texts):
        ref_c, ref_r = round(rng.uniform(-900.0, -20.0), 4), round(rng.uniform(-900.0, -20.0), 4)
        user = {"role": "user", "content": p}
        chosen, rejected = {"role": "assistant", "content": c}, {"role": "assistant", "content": r}
        if args.format == "trl":
            records.append({"prompt_id": f"lb-{i}", "prompt": [user], "chosen": [chosen], "rejected": [rejected],
                            "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r})
        else:
            records.append({"prompt_id": f"lb-{i}", "chosen": [user, chosen], "rejected": [user, rejected],
                            "chosen_logprob": ref_c, "rejected_logprob": ref_r})
    write_jsonl(path, records)
    # The realised counts of a sample: each text alone, without special tokens (the template adds its own).
    step = max(1, args.pairs // REALISED_SAMPLE)
    rows = list(range(0, args.pairs, step))[:REALISED_SAMPLE]
    realised = {}
    for k, name in enumerate(("prompt", "chosen", "rejected")):
        ids = tokenizer([texts[i][k] for i in rows], add_special_tokens=False)["input_ids"]
        got, want = [len(x) for x in ids], [planned[i][k] for i in rows]
        realised[name] = {"planned_mean_all": statistics.fmean(p[k] for p in planned),
                          "planned_mean_sample": statistics.fmean(want), "realised_mean_sample": statistics.fmean(got),
                          "realised_min_sample": min(got), "realised_max_sample": max(got),
                          "mean_abs_error_sample": statistics.fmean(abs(a - b) for a, b in zip(got, want))}
    meta = {"path": str(path), "pairs": args.pairs, "format": args.format, "seed": args.seed,
            "tokenizer": args.tokenizer, "data_version": DATA_VERSION, "bytes": path.stat().st_size,
            "sentence_pool": SENTENCE_POOL, "prompt_content_tokens": PROMPT_TOKENS,
            "reply_content_tokens": REPLY_TOKENS, "distinct_texts": len(seen), "texts": 3 * args.pairs,
            "redrawn_duplicates": redrawn, "realised_sample_pairs": len(rows), "token_counts": realised,
            "generation_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(meta_path, meta)
    return path, meta


# -------------------------------------------------------------------------------------------- the subprocesses

def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (datasets' num_proc workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.exists() else 0


class Window:
    """The timed span: wall and CPU seconds, peak RSS, other processes' load, cache files written."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir

    def __enter__(self) -> Window:
        self.files0 = _count_files(self.cache_dir)
        self.reset = reset_peak_rss()
        self.busy0, self.cpu0 = cpu_busy_s(), _cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = _cpu_s() - self.cpu0
        busy1 = cpu_busy_s()
        peak = status_kb("VmHWM") if self.reset else None
        other = None
        if self.busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - self.busy0 - self.cpu) / (self.seconds * (os.cpu_count() or 1)))
        self.info = {"seconds": self.seconds, "cpu_seconds": self.cpu, "other_load": other,
                     "peak_rss_mb": peak / 1024 if peak else None,
                     "cache_files_written": _count_files(self.cache_dir) - self.files0}


def child_refdpo(spec: dict, sample: set[str]) -> dict:
    t0 = time.perf_counter()
    from refdpo.config import DataSpec
    from refdpo.data import load_pairs, parse_ref_columns
    from refdpo.tokenization import load_tokenizer

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec["tokenizer_dir"])
    tokenizer_s = time.perf_counter() - t0
    data_spec = DataSpec(dataset=spec["data"], template="model", max_len=spec["max_len"], on_truncated="drop",
                         cache_dir=spec["cache_dir"])
    ref_columns = parse_ref_columns(spec["ref_columns"])
    with Window(Path(spec["cache_dir"])) as w:
        data = load_pairs(data_spec, "train", tokenizer, ref_columns)
    starts = [s.response_start for s in data.chosen]
    replies = [len(s.input_ids) - s.response_start for s in data.chosen + data.rejected]
    ids = {}
    for i, row in enumerate(data.rows.tolist()):
        if (pid := f"lb-{row}") in sample:  # make_split's prompt_id of that row
            ids[pid] = {"chosen": data.chosen[i].input_ids.tolist(), "rejected": data.rejected[i].input_ids.tolist(),
                        "start": [data.chosen[i].response_start, data.rejected[i].response_start]}
    return {**w.info, "import_s": import_s, "tokenizer_load_s": tokenizer_s, "pairs_in": data.stats["rows"],
            "pairs_out": len(data), "tokens": int(data.token_counts().sum()),
            "prompt_tokens_mean": statistics.fmean(starts), "reply_tokens_mean": statistics.fmean(replies),
            "stats": data.stats, "sample_ids": ids}


def child_trl(spec: dict, sample: set[str]) -> dict:
    t0 = time.perf_counter()
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    tokenizer_s = time.perf_counter() - t0
    # output_dir inside the cache folder, the same for both runs: the filter's fingerprint hashes the config.
    config = DPOConfig(output_dir=str(Path(spec["cache_dir"]) / "trl_out"), max_length=spec["max_len"],
                       dataset_num_proc=spec["num_proc"], report_to="none",
                       use_cpu=True)  # else TrainingArguments refuses its default bf16 on a CPU-only machine
    stand_in = SimpleNamespace(_tokenizer=tokenizer)  # all of `self` that _prepare_dataset reads
    with Window(Path(spec["cache_dir"])) as w:
        raw = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache_dir"])
        ds = DPOTrainer._prepare_dataset(stand_in, raw, tokenizer, config, "train")
    table = ds.select_columns(["prompt_id", "prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    p, c, r = (pc.list_value_length(table.column(k)).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    ids = {}
    for i, pid in enumerate(table.column("prompt_id").to_pylist()):
        if pid in sample:
            prompt = table.column("prompt_ids")[i].as_py()
            ids[pid] = {"chosen": prompt + table.column("chosen_ids")[i].as_py(),
                        "rejected": prompt + table.column("rejected_ids")[i].as_py(), "start": [len(prompt)] * 2}
    return {**w.info, "import_s": import_s, "tokenizer_load_s": tokenizer_s, "pairs_in": len(raw),
            "pairs_out": len(ds), "tokens": 2 * sum(p) + sum(c) + sum(r), "prompt_tokens_mean": statistics.fmean(p),
            "reply_tokens_mean": statistics.fmean(c + r), "fingerprint": ds._fingerprint, "sample_ids": ids}


def child_main(spec: dict) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        result = {"ok": True, **{"refdpo": child_refdpo, "trl": child_trl}[spec["tool"]](spec, set(spec["sample"]))}
    except Exception as e:  # e.g. refdpo rejecting a format it does not read yet: reported, the others go on
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: " + " | ".join(str(e).splitlines()[:3])}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------- the parent

def run_child(spec: dict, args: argparse.Namespace) -> dict:
    """One timed load in a fresh process (after waiting for quiet); its result, with what it said on stderr."""
    waited, load_before = wait_for_quiet(args.max_other_load, args.idle_wait)
    env = dict(os.environ, HF_DATASETS_CACHE=spec["cache_dir"], PYTHONUNBUFFERED="1")
    if args.tokenizers_parallelism != "default":
        env["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    else:  # as a user runs either tool
        env.pop("TOKENIZERS_PARALLELISM", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.child_timeout)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = e.stdout or "", e.stderr or "", "timeout"
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
    result = json.loads(lines[-1][len(RESULT_TAG):]) if lines else {
        "ok": False, "error": f"subprocess exited {code}: " + " | ".join(err.strip().splitlines()[-3:])}
    notes = []  # warnings and the like, once each (TRL's, datasets', tokenizers', refdpo's)
    for line in err.splitlines():
        if line.strip() and not line.startswith((" ", "Traceback")) and line[:300] not in notes:
            notes.append(line[:300])
    result.update(subprocess_wall_s=time.perf_counter() - t0, waited_for_quiet_s=round(waited, 1),
                  other_load_before=load_before, stderr_notes=notes[:20])
    return result


TRAILING = "TRL has trailing whitespace tokens after the end token"


def classify(trl: list[int], ref: list[int], trl_start: int, ref_start: int, tokenizer) -> tuple[str, str | None]:
    """Why TRL's ids for one sequence differ from refdpo's ("identical" if they do not), and for TRAILING the
    extra tokens as text."""
    start = "" if trl_start == ref_start else ", response start differs"
    if trl == ref:
        return ("identical" if not start else "same ids" + start), None
    if len(trl) > len(ref) and trl[:len(ref)] == ref and not (extra := tokenizer.decode(trl[len(ref):])).strip():
        # e.g. zephyr: "</s>\n" ends each turn; refdpo drops whitespace after the end token, TRL keeps it.
        return TRAILING + start, f"{len(trl) - len(ref)} tokens {extra!r}"
    bos = tokenizer.bos_token_id
    if bos is not None and [t for t in trl[:1] if t != bos] + trl[1:] == [t for t in ref[:1] if t != bos] + ref[1:]:
        return "BOS differs" + start, None
    n = next((i for i, (a, b) in enumerate(zip(trl, ref)) if a != b), min(len(trl), len(ref)))
    return f"other: first difference at token {n} ({'prompt' if n < ref_start else 'response'}){start}", None


def equivalence(refdpo: dict, trl: dict, tokenizer) -> dict:
    """refdpo's vs TRL's token ids on the sampled pairs."""
    kinds: dict[str, int] = {}
    extras: dict[str, int] = {}
    identical = trailing_only = 0
    first_other = None
    for pid, r in refdpo.items():
        t = trl.get(pid)
        if t is None:
            kinds["missing from TRL's output"] = kinds.get("missing from TRL's output", 0) + 1
            continue
        found = []
        for k, side in enumerate(("chosen", "rejected")):
            kind, extra = classify(t[side], r[side], t["start"][k], r["start"][k], tokenizer)
            found.append(kind)
            kinds[kind] = kinds.get(kind, 0) + 1
            if extra is not None:
                extras[extra] = extras.get(extra, 0) + 1
            if kind.startswith("other") and first_other is None:
                first_other = {"prompt_id": pid, "side": side, "kind": kind}
        identical += all(k == "identical" for k in found)
        trailing_only += all(k in ("identical", TRAILING) for k in found)
    out = {"pairs_compared": len(refdpo), "pairs_identical": identical,
           "pairs_identical_but_trailing_whitespace": trailing_only, "sequences_by_kind": kinds,
           "trailing_extras": extras, "first_other": first_other}
    if extras:
        out["note"] = ("structural: the chat template writes whitespace after the end-of-turn token (zephyr: "
                       "'</s>\\n' after every turn); TRL tokenises the rendering as it is, so its completions end with "
                       "those extra tokens, while refdpo strips whitespace after the end token so that the response "
                       "ends at it (what RefDPO scored). TRL's token counts include them.")
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summarise(runs: list[dict], variants: list[str], pairs: int) -> dict:
    summary = {}
    for variant in variants:
        for kind in RUNS:
            ok = [r for r in runs if r["variant"] == variant and r["run"] == kind and r.get("ok")]
            failed = [r.get("error") for r in runs if r["variant"] == variant and r["run"] == kind and not r.get("ok")]
            s = _median([r["seconds"] for r in ok])
            tokens = _median([r["tokens"] for r in ok])
            summary[f"{variant}/{kind}"] = {
                "variant": variant, "run": kind, "runs_ok": len(ok), "errors": failed, "seconds": s,
                "seconds_each": [r["seconds"] for r in ok], "pairs_per_s": pairs / s if s else None,
                "tokens": tokens, "tokens_per_s": tokens / s if s and tokens else None,
                "tokenizer_load_s": _median([r["tokenizer_load_s"] for r in ok]),
                "import_s": _median([r["import_s"] for r in ok]), "cpu_seconds": _median([r["cpu_seconds"] for r in ok]),
                "peak_rss_mb": _median([r["peak_rss_mb"] for r in ok]),
                "cache_files_written": _median([r["cache_files_written"] for r in ok]),
                "other_load_max": max((r["other_load"] for r in ok if r["other_load"] is not None), default=None)}
    return summary


def headline(summary: dict, variants: list[str]) -> dict:
    """refdpo's and TRL's figure per run kind (TRL: its faster num_proc setting), and TRL's time over refdpo's."""
    out = {}
    trl = [v for v in variants if v.startswith("trl")]
    for kind in RUNS:
        ref = summary.get(f"refdpo/{kind}", {}).get("seconds")
        timed = [(summary[f"{v}/{kind}"]["seconds"], v) for v in trl if summary[f"{v}/{kind}"]["seconds"]]
        best = min(timed)[1] if timed else None
        trl_s = summary[f"{best}/{kind}"]["seconds"] if best else None
        out[kind] = {"refdpo_s": ref, "trl_s": trl_s, "trl_variant": best,
                     "trl_over_refdpo": trl_s / ref if trl_s and ref else None}
    return out


def print_report(out: dict) -> None:
    summary, head = out["summary"], out["headline"]
    d = out["data"]
    print(f"\n{d['pairs']} pairs ({d['format']} format, {out['config']['tokenizer']} tokenizer, "
          f"{d['bytes'] / 2**20:.0f} MB), repeat {out['config']['repeat']}; median seconds")
    print(f"{'tool':<20} {'run':<7} {'seconds':>8} {'pairs/s':>9} {'tokens/s':>10} {'TRL/refdpo':>10} "
          f"{'tok load s':>10} {'cpu s':>7} {'peak RSS MB':>11} {'cache files':>11} {'other load':>10}")
    for s in summary.values():
        ref = summary.get(f"refdpo/{s['run']}", {}).get("seconds")
        ratio = s["seconds"] / ref if s["variant"] != "refdpo" and s["seconds"] and ref else None
        mark = "*" if head[s["run"]]["trl_variant"] == s["variant"] else ""
        load = f"{100 * s['other_load_max']:.0f}%" if s["other_load_max"] is not None else "n/a"
        print(f"{s['variant'] + mark:<20} {s['run']:<7} {_fmt(s['seconds']):>8} {_fmt(s['pairs_per_s'], '.0f'):>9} "
              f"{_fmt(s['tokens_per_s'], '.0f'):>10} {_fmt(ratio):>10} {_fmt(s['tokenizer_load_s']):>10} "
              f"{_fmt(s['cpu_seconds'], '.1f'):>7} {_fmt(s['peak_rss_mb'], '.0f'):>11} "
              f"{_fmt(s['cache_files_written'], '.0f'):>11} {load:>10}")
        for error in s["errors"]:
            print(f"  FAILED: {error}")
    print("(*: TRL's figure, its faster dataset_num_proc; TRL/refdpo: TRL's seconds over refdpo's, same run kind)")
    for kind, h in head.items():
        print(f"{kind} run: refdpo {_fmt(h['refdpo_s'])} s, TRL {_fmt(h['trl_s'])} s ({h['trl_variant']}): "
              f"TRL/refdpo {_fmt(h['trl_over_refdpo'])}")
    e = out.get("equivalence")
    if e:
        print(f"token ids: {e['pairs_identical']}/{e['pairs_compared']} sampled pairs identical, "
              f"{e['pairs_identical_but_trailing_whitespace']} up to TRL's trailing whitespace; by sequence: "
              + ", ".join(f"{k} {v}" for k, v in e["sequences_by_kind"].items())
              + "".join(f"; TRL's extra: {k} ({v} sequences)" for k, v in e["trailing_extras"].items()))
    for name, t in d["token_counts"].items():
        print(f"{name} content tokens: planned mean {t['planned_mean_all']:.1f}, realised mean on "
              f"{d['realised_sample_pairs']} pairs {t['realised_mean_sample']:.1f} (planned "
              f"{t['planned_mean_sample']:.1f}, mean |error| {t['mean_abs_error_sample']:.2f})")


def machine_info() -> dict:
    import datasets
    import transformers

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "transformers": transformers.__version__, "datasets": datasets.__version__, "trl": trl_version()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=60_000, help="pairs in the split (default 60000)")
    p.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="mistral", help="default mistral (zephyr template)")
    p.add_argument("--format", choices=FORMATS, default="trl",
                   help="trl: prompt apart, ref_*_logps (default); messages: refdpo's own format")
    p.add_argument("--repeat", type=int, default=1, help="first+second run pairs per tool (default 1; medians)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of refdpo,trl")
    p.add_argument("--trl-num-proc", default="none,2", help="TRL dataset_num_proc settings to measure (default none,2)")
    p.add_argument("--sample", type=int, default=200, help="pairs whose token ids are compared (default 200)")
    p.add_argument("--tokenizers-parallelism", choices=("default", "true", "false"), default="default",
                   help="TOKENIZERS_PARALLELISM in the subprocesses (default: unset, as either tool runs)")
    p.add_argument("--max-other-load", type=float, default=0.10,
                   help="before each run, wait (at most --idle-wait s) until other processes use at most this share "
                        "of the cores (default 0.10)")
    p.add_argument("--idle-wait", type=float, default=60.0, help="seconds to wait for quiet (default 60)")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per subprocess (default 3600)")
    p.add_argument("--keep-caches", action="store_true", help="keep each tool's cache folder after its runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "load_bench",
                   help="tokenizers, generated splits and run caches (default benchmarks/.cache/load_bench)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/load_bench_<tokenizer>.json")
    args = p.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    if unknown := set(args.tools) - set(TOOLS):
        p.error(f"unknown --tools: {', '.join(sorted(unknown))}")
    try:
        args.num_procs = [None if x.strip().lower() == "none" else int(x) for x in args.trl_num_proc.split(",")]
    except ValueError:
        p.error("--trl-num-proc: comma-separated 'none' or integers")
    if min(args.pairs, args.repeat, args.sample) < 1:
        p.error("--pairs, --repeat and --sample must be >= 1")
    args.workdir = args.workdir.resolve()
    args.out = args.out or ROOT / "benchmarks" / "results" / f"load_bench_{args.tokenizer}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(json.loads(argv[1]))
    args = parse_args(argv)
    t0 = time.perf_counter()
    folder = tokenizer_folder(args.tokenizer, args.workdir)
    split, meta = make_split(args, folder)
    print(f"split {split} ({time.perf_counter() - t0:.1f}s; generated in {meta['generation_s']}s)", flush=True)
    step = max(1, args.pairs // args.sample)
    sample = [f"lb-{i}" for i in range(0, args.pairs, step)][:args.sample]
    variants = {"refdpo": {"tool": "refdpo", "num_proc": None}} if "refdpo" in args.tools else {}
    for n in args.num_procs if "trl" in args.tools else []:
        variants[f"trl(num_proc={n})"] = {"tool": "trl", "num_proc": n}
    runs, samples = [], {}
    for rep in range(args.repeat):
        for variant, v in variants.items():
            cache = args.workdir / "runs" / variant.replace("(", "-").replace(")", "").replace("=", "")
            shutil.rmtree(cache, ignore_errors=True)  # the first run starts from an empty cache
            cache.mkdir(parents=True)
            for kind in RUNS:
                spec = {**v, "data": str(split), "tokenizer_dir": str(folder), "cache_dir": str(cache),
                        "max_len": MAX_LEN, "ref_columns": REF_COLUMNS[args.format], "sample": sample}
                r = run_child(spec, args)
                samples.setdefault(variant, r.pop("sample_ids", None))
                r.update(variant=variant, run=kind, rep=rep)
                runs.append(r)
                if r.get("ok"):
                    print(f"rep {rep + 1}/{args.repeat} {variant:<18} {kind:<6} {r['seconds']:8.2f}s (tokenizer "
                          f"{r['tokenizer_load_s']:.2f}s, cpu {r['cpu_seconds']:.1f}s, {r['pairs_out']} pairs, "
                          f"{r['cache_files_written']} cache files)", flush=True)
                else:
                    print(f"rep {rep + 1}/{args.repeat} {variant:<18} {kind:<6} FAILED: {r['error']}", flush=True)
            if not args.keep_caches:
                shutil.rmtree(cache, ignore_errors=True)
    summary = summarise(runs, list(variants), args.pairs)
    equiv = None
    trl_sample = next((samples[v] for v in variants if v.startswith("trl") and samples.get(v)), None)
    if samples.get("refdpo") and trl_sample:
        from transformers import AutoTokenizer

        equiv = equivalence(samples["refdpo"], trl_sample, AutoTokenizer.from_pretrained(str(folder)))
    out = {"benchmark": "data loading: read, validate, tokenise a preference split (benchmarks/load_bench.py)",
           "command": " ".join([".venv/bin/python", "benchmarks/load_bench.py", *argv]), "machine": machine_info(),
           "config": {"tokenizer": args.tokenizer, "tokenizer_dir": str(folder), "format": args.format,
                      "pairs": args.pairs, "repeat": args.repeat, "max_len": MAX_LEN, "seed": args.seed,
                      "template": "model (the tokenizer's chat template)", "ref_columns": REF_COLUMNS[args.format],
                      "trl_num_proc": args.num_procs, "tokenizers_parallelism": args.tokenizers_parallelism,
                      "max_other_load": args.max_other_load,
                      "order": "for rep: for tool variant: first (empty cache), second (same cache)"},
           "data": meta, "summary": summary, "headline": headline(summary, list(variants)), "equivalence": equiv,
           "runs": runs}
    print_report(out)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
