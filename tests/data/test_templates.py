"""Chat templates and the response mask, against hand-written expected strings and tokens."""

from __future__ import annotations

import copy

import pytest

from refdpo.data import build_pairs
from refdpo.data.loading import RawSplit
from refdpo.data.templates import check_template, render, tokenize_rendered
from refdpo.errors import ConfigError, DataError, DataErrors


def encode(messages, template, tokenizer, max_len=512):
    prompt, full = render(messages, template, tokenizer)
    (enc,), merges = tokenize_rendered([prompt], [full], tokenizer, template, max_len)
    assert merges == 0
    ids = enc.input_ids.tolist()
    return (tokenizer.decode(ids[:enc.response_start]), tokenizer.decode(ids[enc.response_start:]),
            tokenizer.convert_ids_to_tokens(ids[enc.response_start:]))


SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there "},
          {"role": "assistant", "content": " Hello! "}]
MULTI = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Nile."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "The Amazon."}]


def test_tulu_system_turn(tiny_tokenizer):
    prompt, response, tokens = encode(SYSTEM, "tulu", tiny_tokenizer)
    assert prompt == "<s><|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert response == "Hello!</s>"
    assert tokens == tiny_tokenizer.tokenize("Hello!") + ["</s>"]


def test_zephyr_inserts_eos_after_prompt_turns(tiny_tokenizer):
    prompt, response, tokens = encode(SYSTEM, "zephyr", tiny_tokenizer)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    assert response == "Hello!</s>"
    assert tokens == tiny_tokenizer.tokenize("Hello!") + ["</s>"]


@pytest.mark.parametrize("template,eos_after_user", [("tulu", ""), ("zephyr", "</s>")])
def test_multi_turn_counts_only_the_final_reply(tiny_tokenizer, template, eos_after_user):
    prompt, response, tokens = encode(MULTI, template, tiny_tokenizer)
    assert prompt == (f"<s><|user|>\nName a river.{eos_after_user}\n<|assistant|>\nThe Nile.</s>\n"
                      f"<|user|>\nAnother?{eos_after_user}\n<|assistant|>\n")
    assert response == "The Amazon.</s>"
    assert tokens == tiny_tokenizer.tokenize("The Amazon.") + ["</s>"]


def test_model_template_uses_the_tokenizers_chat_template(tiny_tokenizer):
    prompt, response, tokens = encode(SYSTEM, "model", tiny_tokenizer)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Hi there <|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert response == " Hello! <|im_end|>"  # the chat template keeps content as is; trailing "\n" dropped
    assert tokens[-1] == "<|im_end|>"


def test_pair_shares_the_prompt_and_differs_only_in_the_reply(tiny_tokenizer):
    record = {"chosen": MULTI, "rejected": MULTI[:-1] + [{"role": "assistant", "content": "No."}]}
    data = build_pairs(RawSplit([record], "mem"), tiny_tokenizer, "zephyr", 512, ref_columns=None)
    c, r = data.chosen[0], data.rejected[0]
    assert c.response_start == r.response_start
    assert c.input_ids[:c.response_start].tolist() == r.input_ids[:r.response_start].tolist()
    assert tiny_tokenizer.decode(r.input_ids[r.response_start:].tolist()) == "No.</s>"


def _records(tokenizer, n=3):
    long_prompt = " ".join(["word"] * 200)
    base = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]}
    records = [copy.deepcopy(base) for _ in range(n)]
    if n > 1:
        for side in ("chosen", "rejected"):
            records[1][side][0]["content"] = long_prompt
    return records


def test_truncated_away_response_is_dropped_and_counted(tiny_tokenizer):
    data = build_pairs(RawSplit(_records(tiny_tokenizer), "mem"), tiny_tokenizer, "tulu", 64, ref_columns=None)
    assert len(data) == 2 and data.rows.tolist() == [0, 2]
    assert data.stats["dropped_truncated"] == 1
    assert all(e.response_tokens > 0 for e in data.chosen + data.rejected)


def test_truncated_away_response_is_an_error_naming_the_row(tiny_tokenizer):
    with pytest.raises(DataErrors) as info:
        build_pairs(RawSplit(_records(tiny_tokenizer), "mem.jsonl"), tiny_tokenizer, "tulu", 64, ref_columns=None,
                    on_truncated="error")
    (line,) = str(info.value).splitlines()
    assert line.startswith("mem.jsonl: row 1: field 'chosen': the response is truncated away by max_len=64")


def test_partially_truncated_response_is_kept_without_end_token(tiny_tokenizer):
    records = _records(tiny_tokenizer, 1)
    full = render(records[0]["chosen"], "tulu", tiny_tokenizer)[1]
    length = len(tiny_tokenizer(full)["input_ids"])
    data = build_pairs(RawSplit(records, "mem"), tiny_tokenizer, "tulu", length - 2, ref_columns=None)
    assert data.stats["partially_truncated"] == 1
    assert len(data.chosen[0].input_ids) == length - 2
    assert tiny_tokenizer.eos_token_id not in data.chosen[0].input_ids[data.chosen[0].response_start:].tolist()


class MergingTokenizer:
    """Characters as tokens, except that "\\nH" is one token: the prompt "...\\n" is not a token prefix of
    the conversation "...\\nHello" (a boundary merge, as BPE tokenizers can produce)."""

    def __call__(self, texts, add_special_tokens=True, **_):
        out = []
        for text in texts:
            ids, i = [], 0
            while i < len(text):
                if text.startswith("\nH", i):
                    ids.append(1000)
                    i += 2
                else:
                    ids.append(ord(text[i]))
                    i += 1
            out.append(ids)
        return {"input_ids": out}


def test_boundary_merge_counts_the_merged_token_as_response():
    (enc,), merges = tokenize_rendered(["A\n"], ["A\nHi"], MergingTokenizer(), "tulu", 100)
    assert merges == 1
    assert enc.input_ids.tolist() == [ord("A"), 1000, ord("i")]
    assert enc.response_start == 1  # the merged "\nH" belongs to the response


def test_template_checks(tiny_tokenizer):
    check_template("tulu", tiny_tokenizer)
    with pytest.raises(ConfigError, match="unknown template"):
        check_template("chatml", tiny_tokenizer)
    no_chat = copy.deepcopy(tiny_tokenizer)
    no_chat.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        check_template("model", no_chat)


def test_a_split_renders_in_one_call_as_it_would_one_by_one(tiny_tokenizer):
    """build_pairs applies the chat template to a whole chunk at once; the texts are those of render()."""
    from refdpo.data.pairs import _render

    pairs = list(enumerate([(SYSTEM, SYSTEM[:-1] + [{"role": "assistant", "content": "No."}]), (MULTI, MULTI)]))
    prompts, fulls = _render(pairs, "model", tiny_tokenizer, "mem", lambda row: None)
    expected = [render(m, "model", tiny_tokenizer) for _, pair in pairs for m in pair]
    assert prompts == [p for p, _ in expected[0::2]] and fulls == [f for _, f in expected]


def test_a_failing_chat_template_names_its_row(tiny_tokenizer):
    failing = copy.deepcopy(tiny_tokenizer)
    failing.chat_template = ("{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}"
                             "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    records = _records(failing, n=3)
    records[2]["rejected"][1]["content"] = "boom"
    with pytest.raises(DataError, match=r"row 2: field .rejected.: template .model. failed: no boom"):
        build_pairs(RawSplit(records, "mem"), failing, "model", 512, ref_columns=None)
