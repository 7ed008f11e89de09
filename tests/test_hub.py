"""Publishing a run on the Hub: the model card and the upload, with the Hub replaced at its two calls only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import train_config

from refdpo.commands.train import train
from refdpo.errors import RefdpoError
from refdpo.hub import model_card, push_folder


@pytest.fixture(scope="module")
def run(tiny_setup, tmp_path_factory):
    """A short run with validation (beta 0.25): (its config as a dict, train's summary)."""
    cfg = train_config(tiny_setup, tmp_path_factory.mktemp("hub") / "run", max_train_pairs=16, max_val_pairs=16,
                       beta=0.25, progress=False)
    return cfg.to_dict(), train(cfg)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """HfApi's create_repo and upload_folder recording their arguments; an upload copies what the library itself
    would select (its own filter on ignore_patterns) into tmp_path/remote/REPO."""
    from huggingface_hub import CommitInfo, HfApi
    from huggingface_hub.utils import filter_repo_objects

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path,
                                        "ignore_patterns": ignore_patterns, **kwargs}))
        root = Path(folder_path)
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, ignore_patterns=ignore_patterns):
            (tmp_path / "remote" / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, tmp_path / "remote" / repo_id / name)
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/abc123", "upload", "", "abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_uploads_weights_tokenizer_and_card(run, hub, tmp_path):
    config, summary = run
    card = model_card(config, summary["data"], summary, base_model="org/tiny-base")
    checkpoint = Path(summary["last"])
    assert (checkpoint / "state").is_dir()  # the resumable state is there, and must stay local

    url = push_folder(checkpoint, "org/tiny-dpo", card, private=True)
    assert url == "https://huggingface.co/org/tiny-dpo/commit/abc123"
    assert [name for name, _ in hub] == ["create_repo", "upload_folder"]
    assert hub[0][1] == {"repo_id": "org/tiny-dpo", "exist_ok": True, "private": True}
    remote = tmp_path / "remote" / "org" / "tiny-dpo"
    uploaded = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= uploaded
    assert not any(name.startswith(("state/", ".")) for name in uploaded)

    text = (remote / "README.md").read_text()
    assert _front_matter(text) == {"library_name": "refdpo", "base_model": "org/tiny-base", "tags": ["refdpo", "dpo"]}
    assert "| beta | 0.25 |" in text
    final = summary["last_val"]["val_loss"]
    assert final != pytest.approx(0.6931, abs=1e-3)  # trained: not the step-0 loss ln 2
    assert f"| loss | {final:.4f} | {summary['best_val_loss']:.4f} |" in text
    assert f"| train | {summary['data']['train']['rows']} | {summary['data']['train']['pairs']} |" in text


def test_card_names_hub_ids_only_and_lora(run):
    config, summary = run
    card = model_card({**config, "dataset": "yale-nlp/RefDPO", "dataset_config": "mistral", "lora": True},
                      summary["data"], summary, base_model=config["model"])  # a local folder
    front = _front_matter(card)
    assert front["datasets"] == ["yale-nlp/RefDPO"] and "base_model" not in front
    assert "yale-nlp/RefDPO (config mistral)" in card and "refdpo merge" in card
    no_val = model_card(config, {"train": summary["data"]["train"], "val": None},
                        {"steps": 2, "last_val": None, "best_step": None, "best_val_loss": None}, "org/base")
    assert "No validation split was used." in no_val


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_hub_error_is_one_line_naming_the_repo(run, hub, monkeypatch, failing):
    from huggingface_hub import HfApi

    def fail(self, *args, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url\nInvalid credentials in Authorization header")

    monkeypatch.setattr(HfApi, failing, fail)
    config, summary = run
    with pytest.raises(RefdpoError) as caught:
        push_folder(Path(summary["best"]), "org/tiny-dpo", model_card(config, summary["data"], summary, "org/b"))
    assert str(caught.value) == ("--push_to_hub org/tiny-dpo: OSError: 401 Client Error: Unauthorized for url "
                                 "(the local folder is complete)")
    assert (Path(summary["best"]) / "README.md").read_text().startswith("---\nlibrary_name: refdpo\n")
