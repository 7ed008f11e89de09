"""Tokenisation with real tokenizers, offline (tests/real_vocab.py: Mistral-7B's sentencepiece model from
mistral-common, llama.cpp's Llama-2 and Llama-3 vocabularies from llama-cpp-python's sources), checked against
sentencepiece itself and llama.cpp's reference vectors; scores on those tokens against float64; checkpoints that
reload to the same ids; a cross-tokenizer reference; tokenizer drift named by `check`."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_config
from real_vocab import llama3_folder, llamacpp_vocab, mistral_folder, sentencepiece_from_gguf

from refdpo.core.logprobs import reference_logprobs_float64
from refdpo.data import build_pairs, collate_pairs, load_split
from refdpo.errors import ConfigError
from refdpo.tokenization import PROBE, check_reload, first_difference, load_tokenizer, save_tokenizer

SPECIAL = ("<s>", "</s>", "<unk>")  # Mistral's special tokens; <|user|> and <|assistant|> are plain text to it


def conversation(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# What UltraFeedback holds, and what breaks tokenisers: whitespace at the edges, runs of spaces, unicode and
# emoji, indented code, replies starting with punctuation or digits, system turns, several turns, one-token
# replies, and literal special-token strings in content, followed by a space or not.
STRESS = [
    ([("user", "What is the capital of France?")], "Paris is the capital of France."),
    ([("user", "  leading and trailing spaces  ")], "   Indented reply with trailing spaces   "),
    ([("user", "Emoji and unicode: Ça va? 😀 🦙 ünïcödé 日本語")], "Très bien! 👍 Ελληνικά, русский."),
    ([("user", "Write a function.")], "```python\ndef f(x):\n    if x:\n        return x  # two  spaces\n```"),
    ([("user", "A number?")], "42 is the answer."),
    ([("user", "Punctuation first?")], "... well, yes!"),
    ([("system", "You are terse."), ("user", "Say yes.")], "Yes"),
    ([("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")], "No."),
    ([("user", "What does </s> mean?")], "</s> marks the end. </s>also without a space, and <s> begins."),
    ([("user", "Explain <unk> and <|assistant|> tags")], "<unk> is unknown; <|assistant|> starts a reply."),
    ([("user", "Tabs\tand\nnewlines\n\n")], "\tTabbed\n\nParagraphs\n"),
    ([("user", "x")], "!"),
]


def records() -> list[dict]:
    out = []
    for k, (turns, reply) in enumerate(STRESS):
        prompt = conversation(*turns)
        other = STRESS[(k + 1) % len(STRESS)][1]
        out.append({"prompt_id": f"stress-{k}", "prompt": prompt[-1]["content"],
                    "chosen": prompt + conversation(("assistant", reply)),
                    "rejected": prompt + conversation(("assistant", other))})
    return out


def refdpo_format(messages: list[dict], insert_eos: bool) -> tuple[str, str]:
    """RefDPO's format written out plainly (paper-notes.md §5): `<|user|>\\n{prompt}{EOS?}\\n<|assistant|>\\n
    {response}</s>`, system turns as `<|system|>\\n`, every content stripped, the whole text stripped; the
    prompt is everything before the final response."""
    text = ""
    for m in messages[:-1]:
        end = "</s>" if m["role"] == "assistant" or insert_eos else ""
        text += f"<|{m['role']}|>\n{m['content'].strip()}{end}\n"
    prompt = text + "<|assistant|>\n"
    return prompt, (prompt + messages[-1]["content"].strip() + "</s>").strip()


def sentencepiece_ids(sp, text: str) -> list[int]:
    """How the slow tokenizer RefDPO used tokenises (transformers' LlamaTokenizer, use_fast=False, legacy=True):
    BOS, then the text split at the special tokens, every other piece encoded by sentencepiece itself (each with
    its dummy-prefix "▁")."""
    ids = [sp.bos_id()]
    for part in re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text):
        ids += [sp.piece_to_id(part)] if part in SPECIAL else sp.encode(part) if part else []
    return ids


@pytest.fixture(scope="session")
def vocab(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    llama2 = root / "llama2"
    sentencepiece_from_gguf(llamacpp_vocab("llama-spm")[0], llama2 / "tokenizer.model")
    (llama2 / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True}))
    return {"mistral": mistral_folder(root / "mistral"), "mistral_spm": mistral_folder(root / "spm", spm_only=True),
            "llama2": llama2, "llama3": llama3_folder(root / "llama3")}


@pytest.fixture(scope="session")
def sp(vocab):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(vocab["mistral"] / "tokenizer.model"))


def tiny_model(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A random-init Llama on the tokenizer's whole vocabulary, with the tokenizer's own files beside it."""
    from refdpo.testbed.tiny import tiny_llama

    tokenizer = load_tokenizer(str(tokenizer_dir))
    tiny_llama(tokenizer, hidden=16, layers=1, heads=2, kv_heads=1, seed=seed, max_positions=512).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


@pytest.fixture(scope="session")
def models(vocab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: tiny_model(vocab[name], root / name, seed) for seed, name in enumerate(("mistral", "llama3"))}


@pytest.fixture(scope="session")
def stress_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stress")
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    return folder


# --- the loader against the reference implementations ------------------------------------------------------


@pytest.mark.parametrize("template", ["tulu", "zephyr"])
@pytest.mark.parametrize("folder", ["mistral", "mistral_spm"], ids=["hub_layout", "sentencepiece_only"])
def test_mistral_tokenises_the_refdpo_format_as_sentencepiece(vocab, sp, stress_data, template, folder):
    """Token ids and response start of every sequence equal the plain rendering tokenised by sentencepiece."""
    tokenizer = load_tokenizer(str(vocab[folder]))
    data = build_pairs(load_split(str(stress_data), "train"), tokenizer, template, 4096, None)
    assert len(data) == len(STRESS)
    for record, chosen, rejected in zip(records(), data.chosen, data.rejected):
        for side, encoded in (("chosen", chosen), ("rejected", rejected)):
            prompt, full = refdpo_format(record[side], insert_eos=template == "zephyr")
            assert encoded.input_ids.tolist() == sentencepiece_ids(sp, full), (record["prompt_id"], side)
            assert encoded.response_start == len(sentencepiece_ids(sp, prompt)), (record["prompt_id"], side)


@pytest.mark.parametrize("folder", ["mistral", "mistral_spm"], ids=["hub_layout", "sentencepiece_only"])
def test_the_probe_and_raw_texts_equal_sentencepiece(vocab, sp, folder):
    """Also the two pitfalls of building from tokenizer.model alone met with transformers 5:
    `LlamaTokenizerFast(vocab_file=...)` makes a 3-token vocabulary, and its conversion of such a folder ranks
    merges by piece id, so runs of spaces in code merge otherwise ('▁▁', 'sp', 'aces' for '▁', '▁spaces')."""
    tokenizer = load_tokenizer(str(vocab[folder]))
    assert len(tokenizer) == sp.get_piece_size() == 32000
    texts = [*PROBE, *(reply for _, reply in STRESS), "    x = 1\n" * 3, " " * 9 + "nine spaces",
             "        return x  # two  spaces"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == sentencepiece_ids(sp, text), text


def test_where_transformers_builds_another_tokenizer_the_files_win_and_the_log_says_so(vocab, caplog):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    written = Tokenizer.from_file(str(vocab["mistral"] / "tokenizer.json"))
    built = AutoTokenizer.from_pretrained(str(vocab["mistral"])).backend_tokenizer
    with caplog.at_level(logging.WARNING, logger="refdpo.tokenization"):
        loaded = load_tokenizer(str(vocab["mistral"]))
    assert first_difference(loaded.backend_tokenizer, written) is None
    if first_difference(built, written) is None:  # an installed transformers that keeps the file's pipeline
        assert not caplog.records
    else:  # transformers 5: rebuilt from the class, another normaliser ('</s> mean' loses a '▁')
        assert len(caplog.records) == 1 and "using its tokenizer.json as written" in caplog.records[0].message


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe"])
def test_llamacpp_reference_vectors_pass_through_the_loader(vocab, name):
    """llama.cpp's own reference tokenisations: Llama-2 (a sentencepiece model, loaded from tokenizer.model
    alone) and Llama-3 (Meta's tokenizer.json layout)."""
    _, vectors = llamacpp_vocab(name)
    tokenizer = load_tokenizer(str(vocab["llama2" if name == "llama-spm" else "llama3"]))
    assert len(vectors) == 47
    for text, ids in vectors:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text


# --- scores, checkpoints, references from another tokenizer ------------------------------------------------


def test_scores_on_the_real_tokens_equal_float64(models, stress_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from refdpo.commands.score import ScoreConfig, score
    from refdpo.modeling import pad_token_id

    out = tmp_path / "scored.jsonl"
    score(ScoreConfig(model=str(models["mistral"]), dataset=str(stress_data), split="train", out=str(out),
                      template="zephyr", max_len=4096, progress=False).validate())
    tokenizer = load_tokenizer(str(models["mistral"]))
    data = build_pairs(load_split(str(out), "train"), tokenizer, "zephyr", 4096, ("chosen_logprob", "rejected_logprob"))
    model = AutoModelForCausalLM.from_pretrained(models["mistral"], dtype=torch.float64).eval()
    n = len(data)
    exact = reference_logprobs_float64(model, collate_pairs(data, np.arange(n), np.ones(n),
                                                            pad_token_id(tokenizer))).numpy()
    assert np.max(np.abs(data.ref_chosen - exact[:n])) < 1e-4
    assert np.max(np.abs(data.ref_rejected - exact[n:])) < 1e-4


def test_a_checkpoint_reloads_to_the_same_ids_under_every_template(models, stress_data, tmp_path):
    from refdpo.commands.train import train

    summary = train(train_config(models["mistral"], tmp_path / "run", model=str(models["mistral"]),
                                 dataset=str(stress_data), template="zephyr", ref_free=True, max_len=1024,
                                 batch_size=4))
    raw = load_split(str(stress_data), "train")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):  # the files, as the model has them
        assert (Path(summary["last"]) / name).read_bytes() == (models["mistral"] / name).read_bytes(), name
    assert json.loads((Path(summary["last"]) / "tokenizer_config.json").read_text())["legacy"] is True
    base, saved = load_tokenizer(str(models["mistral"])), load_tokenizer(summary["last"])
    for template in ("tulu", "zephyr", "model"):
        a, b = (build_pairs(raw, t, template, 4096, None) for t in (base, saved))
        assert [e.input_ids.tolist() for e in a.chosen + a.rejected] == \
            [e.input_ids.tolist() for e in b.chosen + b.rejected], template
        assert [e.response_start for e in a.chosen] == [e.response_start for e in b.chosen], template


def test_a_saved_tokenizer_that_tokenises_otherwise_is_refused_naming_the_token(vocab, tmp_path):
    from tokenizers import Tokenizer

    folder = tmp_path / "ckpt"
    save_tokenizer(load_tokenizer(str(vocab["mistral"])), folder)
    damaged = Tokenizer.from_file(str(folder / "tokenizer.json"))
    damaged.normalizer = None  # as transformers 5's save_pretrained + reload loses the legacy normaliser
    damaged.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match=r"reloads to other token ids than training used: token 1 of "
                                          r"'Hello world' is 'Hello' there, '▁Hello' here"):
        check_reload(load_tokenizer(str(vocab["mistral"])), folder, ["Hello world"])


def test_a_llama3_reference_scores_and_a_mistral_policy_trains_on_it(models, stress_data, tmp_path):
    """RefDPO's `llama3` config: references from a 128k-token Llama-3 (its own chat format), a 32k-token
    Mistral policy."""
    from refdpo.commands.score import ScoreConfig, score
    from refdpo.commands.train import train

    data = tmp_path / "data"
    for split in ("train", "val"):
        score(ScoreConfig(model=str(models["llama3"]), dataset=str(stress_data), split=split,
                          out=str(data / f"{split}.jsonl"), template="model", max_len=4096,
                          columns="llama3_chosen,llama3_rejected", progress=False).validate())
    summary = train(train_config(models["mistral"], tmp_path / "run", model=str(models["mistral"]),
                                 dataset=str(data), template="zephyr", max_len=1024, batch_size=4,
                                 ref_columns="llama3_chosen,llama3_rejected"))
    assert summary["steps"] == 3 and np.isfinite(summary["best_val_loss"])
    assert abs(summary["best_val_loss"] - np.log(2)) > 1e-3  # another model's reference


def test_the_model_template_puts_the_response_where_the_llama3_chat_format_does(vocab, stress_data):
    tokenizer = load_tokenizer(str(vocab["llama3"]))
    data = build_pairs(load_split(str(stress_data), "train"), tokenizer, "model", 4096, None)
    for record, encoded in zip(records(), data.chosen):
        reply = record["chosen"][-1]["content"].strip()
        response = tokenizer.decode(encoded.input_ids[encoded.response_start:].tolist(),
                                    clean_up_tokenization_spaces=False)
        assert response == reply + "<|eot_id|>"  # the reply and its end-of-turn token, nothing of the prompt


# --- drift ---------------------------------------------------------------------------------------------------


def test_check_names_the_same_files_tokenising_differently(models, stress_data, tmp_path):
    from refdpo.commands.check import CheckConfig, check
    from refdpo.commands.score import ScoreConfig, score

    out = tmp_path / "scored.jsonl"
    score(ScoreConfig(model=str(models["mistral"]), dataset=str(stress_data), split="val", out=str(out),
                      template="zephyr", max_len=4096, progress=False).validate())
    sidecar = Path(str(out) + ".provenance.json")
    provenance = json.loads(sidecar.read_text())
    entry = provenance["references"]["chosen_logprob,rejected_logprob"]
    assert entry["tokenizer_files_sha256"] and entry["tokenizer_versions"]["transformers"]
    # Another transformers version that tokenised the same files otherwise: same files, other probe ids.
    entry["tokenizer_sha256"] = "0" * 64
    entry["tokenizer_versions"] = {"transformers": "5.0.0", "tokenizers": "0.22.0"}
    sidecar.write_text(json.dumps(provenance))
    report = check(CheckConfig(dataset=str(out), split="train", model=str(models["mistral"]), template="zephyr",
                               max_len=4096, sample=4).validate())
    drift = [w for w in report["warnings"] if "the same files tokenise differently here" in w]
    assert len(drift) == 1 and drift[0].startswith(
        "chosen_logprob,rejected_logprob: tokenizer: the same files tokenise differently here (scored with "
        "transformers 5.0.0, tokenizers 0.22.0; now ")
