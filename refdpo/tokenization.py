"""Tokenising exactly as a model's own files say, and saving a tokenizer so that it reloads to the same ids.

Every number refdpo stores or trains on is a sum over tokens, so the tokens must be the ones the tokenizer files
define. `AutoTokenizer` is not always that: transformers 5 rebuilds the pipeline of a folder whose config names
`LlamaTokenizer` from the class (it keeps the vocabulary and merges of `tokenizer.json` but not its normaliser,
so text after a literal `</s>` or `<s>` tokenises differently), and converts a folder holding only
`tokenizer.model` with merges ranked by piece id instead of score. `load_tokenizer` therefore takes
transformers' tokenizer for what it does well (special tokens, chat template, the Python API), runs it and the
files on PROBE, and where they differ puts the files' pipeline in its place and says so:

  tokenizer.json   used as written (normaliser, pre-tokeniser, model, post-processor, added tokens);
  tokenizer.model  (no tokenizer.json) the sentencepiece model as the Llama converter builds it: BPE merges
                   ranked by piece score, byte fallback, and the config's `legacy` whitespace handling
                   (legacy: every piece between special tokens gets sentencepiece's dummy-prefix "▁", as
                   the slow sentencepiece tokenizer RefDPO used did).

`save_tokenizer` copies the files a tokenizer was loaded from into a checkpoint (transformers' save_pretrained
rewrites tokenizer_config.json and drops `legacy`), so a checkpoint reloads to the same ids as its base model;
`train` checks that right after its first save (`check_reload`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from refdpo.errors import ConfigError, RefdpoError, first_line
from refdpo.io import require_local

log = logging.getLogger(__name__)

# Texts on which two tokenizer pipelines must agree: special tokens followed by text, spaces and newlines,
# whitespace runs, unicode, indented code, digits and punctuation at the start.
PROBE = ("Hello world", " leading space", "trailing space ", "two  spaces and\n\nnewlines\n",
         "</s> mean", "a</s>b", "<s> x", "<unk> y", "</s>\n<|assistant|>\n ok", "<|user|>\nHi</s>\n",
         "    def f(x):\n        return x  # indented", "\tTab", "123 digits", "!? punctuation", "Ça va? 😀 ünïcödé",
         "日本語のテキスト", "```python\nprint('x')\n```")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model.v1")


def _resolve(name: str, filename: str, revision: str | None) -> Path | None:
    """A tokenizer file of a local folder or a hub repo (from the hub cache, fetched if needed), or None."""
    folder = Path(name)
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    from transformers.utils import cached_file

    try:
        path = cached_file(name, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(path) if path else None


def first_difference(a, b, texts=PROBE) -> tuple[str, list[str], list[str]] | None:
    """(text, a's tokens, b's tokens) for the first text two `tokenizers.Tokenizer`s encode differently."""
    for text in texts:
        ea, eb = a.encode(text), b.encode(text)
        if ea.ids != eb.ids:
            return text, ea.tokens, eb.tokens
    return None


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of `name` (hub id or folder) tokenising as its files define (see the module docstring)."""
    from transformers import AutoTokenizer

    require_local(name, "the tokenizer: --tokenizer, else --model")
    if Path(name).is_dir() and not any((Path(name) / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass --tokenizer with the "
                          "folder or hub id of the model's tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise RefdpoError(f"cannot load tokenizer {name!r}: {first_line(e) or type(e).__name__} (--tokenizer "
                          "names another)") from None
    files = {f: p for f in TOKENIZER_FILES if (p := _resolve(name, f, revision)) is not None}
    tokenizer.refdpo_files = files  # what save_tokenizer copies
    built = getattr(tokenizer, "backend_tokenizer", None)
    if built is None:  # a tokenizer with no `tokenizers` pipeline (custom code): nothing to compare with
        return tokenizer
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer

        written, source = Tokenizer.from_file(str(files["tokenizer.json"])), "its tokenizer.json"
    elif "tokenizer.model" in files and _is_bpe(files["tokenizer.model"]):  # unigram models: as transformers does
        config = _read_json(files.get("tokenizer_config.json"))
        written = from_sentencepiece(files["tokenizer.model"], legacy=config.get("legacy", True) is not False,
                                     bos=tokenizer.bos_token if config.get("add_bos_token", True) else None,
                                     eos=tokenizer.eos_token if config.get("add_eos_token", False) else None)
        source = "its sentencepiece model"
    else:
        return tokenizer
    written.no_padding()
    written.no_truncation()
    differs = first_difference(built, written)
    if differs is not None:
        import transformers

        text, got, want = differs
        log.warning("tokenizer %s: transformers %s tokenises %r as %s, %s as %s: using %s as written", name,
                    transformers.__version__, text, got, source.removeprefix("its "), want, source)
        tokenizer._tokenizer = written  # the `tokenizers` pipeline behind PreTrainedTokenizerFast
    return tokenizer


def _is_bpe(model_file: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto.trainer_spec.model_type == pb.TrainerSpec.BPE


def _read_json(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None else {}


def from_sentencepiece(model_file: str | Path, legacy: bool = True, bos: str | None = "<s>",
                       eos: str | None = None):
    """A `tokenizers` pipeline equal to a BPE sentencepiece model, as transformers' Llama converter builds it:
    the pieces and their ids, merges ranked by the merged piece's score, byte fallback, control pieces as
    special tokens, BOS (and EOS) added around a sequence. `legacy`: every piece of text between special tokens
    gets sentencepiece's dummy prefix "▁"; else only the start of the text does (transformers' legacy=False)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())
              if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i))}
    merges = []
    for piece, score in scores.items():  # each way to split a piece into two pieces, ranked by its score
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    unk = sp.id_to_piece(sp.unk_id())
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                                  for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)])
    if legacy:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
    pair = single + " " + " ".join([f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
    special = [(t, vocab[t]) for t in (bos, eos) if t]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tokenizer


def save_tokenizer(tokenizer, out: Path) -> None:
    """Save a tokenizer into a model folder so that `load_tokenizer(out)` gives the same ids: the files it was
    loaded from, copied as they are; a tokenizer built in code is saved by transformers, with its exact
    pipeline as tokenizer.json."""
    files = getattr(tokenizer, "refdpo_files", None)
    out.mkdir(parents=True, exist_ok=True)
    if not files:
        tokenizer.save_pretrained(out)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.save(str(out / "tokenizer.json"))
        return
    for name, path in files.items():
        if Path(path).resolve() != (out / name).resolve():
            shutil.copyfile(path, out / name)


def check_reload(tokenizer, folder: Path, texts: list[str], add_special_tokens: bool = True) -> None:
    """Refuse (ConfigError naming the first differing token) when `folder`'s tokenizer, loaded as every command
    loads it, does not give `tokenizer`'s ids on `texts` and PROBE."""
    reloaded = load_tokenizer(str(folder))
    for text in [*texts, *PROBE]:
        a = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        b = reloaded(text, add_special_tokens=add_special_tokens)["input_ids"]
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mine = tokenizer.convert_ids_to_tokens(a[k]) if k < len(a) else "(end)"
            theirs = reloaded.convert_ids_to_tokens(b[k]) if k < len(b) else "(end)"
            raise ConfigError(f"{folder}: the saved tokenizer reloads to other token ids than training used: token "
                              f"{k} of {text[:60]!r} is {theirs!r} there, {mine!r} here")


def files_fingerprint(tokenizer) -> str:
    """sha256 of what defines the tokenizer: the files it was loaded from (load_tokenizer), else
    its whole pipeline (vocabulary, merges, normaliser); with its special tokens and chat template."""
    files = getattr(tokenizer, "refdpo_files", None)
    digest = hashlib.sha256()
    if files:
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + Path(files[name]).read_bytes())
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        digest.update((backend.to_str() if backend is not None else
                       json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token,
                              getattr(tokenizer, "chat_template", None)]).encode())
    return digest.hexdigest()
