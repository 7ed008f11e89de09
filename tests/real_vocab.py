"""Real tokenizers for the tests, taken from PyPI packages (never the Hugging Face Hub) and cached on disk.

- `mistral-common` 1.13.1 (wheel) ships Mistral-7B-v0.1's sentencepiece model, `tokenizer.model.v1` (sha256
  dadfd56d...): the tokenizer of HuggingFaceH4/mistral-7b-sft-beta, the paper's main policy.
- `llama-cpp-python` 0.3.36 (source distribution, 77 MB) vendors llama.cpp's vocabularies
  `models/ggml-vocab-*.gguf`, each with reference tokenisations (`.inp` texts, `.out` ids) that llama.cpp's own
  test suite checks against: Llama-3 (`llama-bpe`, 128k tokens, the paper's `llama3` reference) and Llama-2
  (`llama-spm`, sentencepiece) among them.

Both files are fetched once through PyPI's simple index into REFDPO_TEST_CACHE (default `.cache/test-vocab` in
the repository, ignored by git), checked against pinned sha256 sums, and never committed. From them this module
builds tokenizer folders laid out as the Hub repos ship them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tarfile
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("REFDPO_TEST_CACHE", REPO / ".cache" / "test-vocab"))
PINNED = {  # file on PyPI -> (project, sha256)
    "mistral_common-1.13.1-py3-none-any.whl": (
        "mistral-common", "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
    "llama_cpp_python-0.3.36.tar.gz": (
        "llama-cpp-python", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"),
}
MISTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
SEPARATOR = "\n__ggml_vocab_test__\n"
# HuggingFaceH4/mistral-7b-sft-beta's chat template (zephyr): an EOS after every turn.
ZEPHYR_TEMPLATE = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
                   "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
                   "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'"
                   "  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}"
                   "\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# Meta-Llama-3-*-Instruct's chat format.
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(filename: str) -> Path:
    """A pinned PyPI file in the cache, downloaded through PyPI's simple index the first time."""
    project, sha256 = PINNED[filename]
    path = CACHE / filename
    if path.is_file() and _sha256(path) == sha256:
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.loads(urllib.request.urlopen(request, timeout=60).read())["files"]
    url = next(f["url"] for f in files if f["filename"] == filename)
    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")
    with urllib.request.urlopen(url, timeout=600) as response, open(tmp, "wb") as out:
        while block := response.read(1 << 20):
            out.write(block)
    if _sha256(tmp) != sha256:
        raise RuntimeError(f"{filename} from PyPI does not have the pinned sha256 {sha256}")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _populating():
    """One process at a time fills the cache (pytest-xdist workers share it); the others wait, then read."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def mistral_sentencepiece() -> Path:
    """Mistral-7B-v0.1's tokenizer.model (from mistral-common's wheel)."""
    with _populating():
        return _mistral_sentencepiece()


def _mistral_sentencepiece() -> Path:
    path = CACHE / "mistral" / "tokenizer.model"
    if not (path.is_file() and _sha256(path) == MISTRAL_SHA256):
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(fetch("mistral_common-1.13.1-py3-none-any.whl")) as wheel:
            path.write_bytes(wheel.read("mistral_common/data/tokenizer.model.v1"))
        assert _sha256(path) == MISTRAL_SHA256
    return path


def llamacpp_vocab(name: str) -> tuple[Path, list[tuple[str, list[int]]]]:
    """llama.cpp's `ggml-vocab-NAME.gguf` and its reference tokenisations [(text, ids without BOS)]."""
    folder = CACHE / "llama.cpp"
    with _populating():
        if not (folder / f"ggml-vocab-{name}.gguf.out").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fetch("llama_cpp_python-0.3.36.tar.gz")) as sdist:
                for member in sdist.getmembers():
                    if "/vendor/llama.cpp/models/ggml-vocab-" in member.name and member.isfile():
                        target = folder / Path(member.name).name
                        target.write_bytes(sdist.extractfile(member).read())
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return folder / f"ggml-vocab-{name}.gguf", [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def mistral_folder(out: Path, spm_only: bool = False) -> Path:
    """A tokenizer folder as HuggingFaceH4/mistral-7b-sft-beta ships it: the sentencepiece model, tokenizer.json as
    transformers' Llama converter writes it (legacy), and tokenizer_config.json with `legacy: true`, class
    LlamaTokenizer and the zephyr chat template. `spm_only`: without tokenizer.json (old Llama-style repos)."""
    from refdpo.tokenization import from_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    model = mistral_sentencepiece()
    (out / "tokenizer.model").write_bytes(model.read_bytes())
    if not spm_only:
        from_sentencepiece(model, legacy=True, bos="<s>").save(str(out / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": {
        "0": _special("<unk>"), "1": _special("<s>"), "2": _special("</s>")}, "additional_special_tokens": [],
        "bos_token": "<s>", "chat_template": ZEPHYR_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True, "model_max_length": 2048, "pad_token": "</s>", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}, indent=2))
    return out


def sentencepiece_from_gguf(gguf_file: Path, out: Path) -> Path:
    """A sentencepiece model file holding a llama.cpp SPM vocabulary (pieces, scores, kinds), with Llama's
    normaliser settings (dummy prefix, whitespace escaped, byte fallback): what the original tokenizer.model
    of that vocabulary holds."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(gguf_file))

    def array(key):
        field = reader.fields[key]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(t).decode("utf-8") for t in array("tokenizer.ggml.tokens")]
    scores = [float(s[0]) for s in array("tokenizer.ggml.scores")]
    kinds = [int(k[0]) for k in array("tokenizer.ggml.token_type")]  # llama.cpp: 1 normal, 2 unknown, 3 control, 6 byte
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    kind_of = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
               3: pb.ModelProto.SentencePiece.CONTROL, 6: pb.ModelProto.SentencePiece.BYTE}
    for token, score, kind in zip(tokens, scores, kinds):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind_of[kind]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out


def llama3_folder(out: Path) -> Path:
    """A Llama-3 tokenizer folder as Meta's repos ship it, from llama.cpp's `llama-bpe` vocabulary as transformers
    converts it, with the two things that conversion leaves out of Meta's tokenizer.json: `ignore_merges` (a
    whole word in the vocabulary is one token, whatever the merges: 'Cửa Việt' needs it) and the
    <|begin_of_text|> that its post-processor adds; and the Llama-3-Instruct chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    gguf_file, _ = llamacpp_vocab("llama-bpe")
    converted = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    spec = json.loads(converted.backend_tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
              "clean_up_tokenization_spaces": True, "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
