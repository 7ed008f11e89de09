"""Publishing a trained model on the Hugging Face Hub: its model card, and the upload of its folder.

The card says what the run was (objective, beta, which reference, the data, the validation metrics) so that a
model on the Hub can be compared with the paper's runs without its run folder. Every failure of a Hub call (no
token, no network, a name taken or invalid) is reported as one line naming the repo (`hub_error`).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from refdpo import __version__
from refdpo.core.metrics import PAIR_METRICS
from refdpo.errors import RefdpoError, first_line
from refdpo.io import atomic_write_text
from refdpo.tables import markdown

CARD_METRICS = PAIR_METRICS[:8]  # the lengths say more about the data than about the model
DATA_COLUMNS = ("rows", "pairs", "dropped_truncated", "partially_truncated")
# The resumable state (optimizer moments: twice the weights) is not the model, nor are temporary files.
NOT_UPLOADED = ["state/*", ".*", "**/.*"]


def hub_error(repo_id: str, error: BaseException, note: str = "") -> RefdpoError:
    """One line for a failed Hub call: what it was for, the exception's kind and first line."""
    return RefdpoError(f"--push_to_hub {repo_id}: {type(error).__name__}: {first_line(error)}{note}")


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id rather than a local path (the Hub's metadata takes ids only), else None."""
    if not name or name.startswith(("/", ".", "~")) or Path(name).exists():
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and ".." not in name else None


def _reference(config: dict) -> str:
    if config.get("loss") == "simpo":
        return "none: SimPO's length-normalised reward needs no reference"
    if config.get("ref_free"):
        return "none (reference-free): the reference term is 0, the paper's posterior reward beta log p(y|x)"
    columns = str(config.get("ref_columns", "chosen_logprob,rejected_logprob")).split(",")
    if config.get("ref_mix") is not None and len(columns) == 4:
        lam = config["ref_mix"]
        return (f"the geometric mixture {lam:g} x (columns `{columns[0]}`, `{columns[1]}`) + {1 - lam:g} x "
                f"(columns `{columns[2]}`, `{columns[3]}`) of two references' log-probs stored in the data")
    return (f"the log-probs stored in the data (columns `{columns[0]}`, `{columns[1]}`), computed once by the "
            "reference")


def model_card(config: dict, data: dict, metrics: dict, base_model: str) -> str:
    """README.md for a trained model: the Hub's YAML front matter, then the run in brief.

    config: the run's settings (`TrainConfig.to_dict()`, or its config.yaml loaded);
    data: train's `summary["data"]`, {"train": stats, "val": stats or None} (rows, pairs, dropped_truncated, ...);
    metrics: train's summary; reads `steps`, `last_val` (the final validation record, val_* keys), `best_step`,
    `best_val_loss`, and `best_val` (the whole record at best_step) when the caller has it;
    base_model: the model training started from (hub id or folder; only an id goes into the front matter)."""
    front: dict = {"library_name": "refdpo"}
    if hub_id(base_model):
        front["base_model"] = base_model
    front["tags"] = ["refdpo", "dpo"]
    if dataset := hub_id(config.get("dataset")):
        front["datasets"] = [dataset]
    dataset = str(config.get("dataset", "")) + (f" (config {config['dataset_config']})"
                                                 if config.get("dataset_config") else "")
    settings = [
        {"setting": "objective", "value": config.get("loss", "dpo")},
        {"setting": "beta", "value": f"{config.get('beta')}"},
        {"setting": "reference", "value": _reference(config)},
        {"setting": "data", "value": f"{dataset}, template {config.get('template')}, max_len {config.get('max_len')}"},
        {"setting": "optimisation", "value": f"{config.get('epochs')} epoch(s), peak lr {config.get('max_lr')}, "
                                             f"{metrics.get('steps')} steps"},
    ]
    if config.get("lora"):
        settings.append({"setting": "LoRA", "value": f"r {config.get('lora_r')}, alpha {config.get('lora_alpha')}, "
                                                     f"targets {config.get('lora_target_modules')}"})
    intro = f"Trained from `{base_model}` with refdpo {__version__} (preference optimisation)."
    if config.get("lora"):
        intro += " The weights are a LoRA adapter on that model: `refdpo merge --adapter . --out merged` folds it in."
    splits = [{"split": name, **{k: stats.get(k) for k in DATA_COLUMNS}} for name, stats in data.items() if stats]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {str(config.get('loss', 'dpo')).upper()} from {Path(base_model).name}", "", intro, "",
             "## Training", "", markdown(settings), "", "## Data", "", markdown(splits), "",
             "## Validation", "", _validation(metrics), ""]
    return "\n".join(lines)


def _validation(metrics: dict) -> str:
    """The final and best validation metrics side by side."""
    final, best = metrics.get("last_val"), dict(metrics.get("best_val") or {})
    if not best and final and metrics.get("best_step") == metrics.get("steps"):  # the final evaluation was the best
        best = dict(final)
    if not final and metrics.get("best_val_loss") is None:
        return "No validation split was used."
    best.setdefault("val_loss", metrics.get("best_val_loss"))
    rows = [{"metric": name, f"final (step {metrics.get('steps')})": (final or {}).get(f"val_{name}"),
             f"best (step {metrics.get('best_step')})": best.get(f"val_{name}")} for name in CARD_METRICS]
    return markdown([r for r in rows if any(v is not None for k, v in r.items() if k != "metric")])


def push_folder(folder: Path, repo_id: str, card: str, private: bool = False, revision: str | None = None) -> str:
    """Write `card` as folder/README.md and upload the folder (not its resumable state) to the model repo
    `repo_id`, created if needed (`revision`: a branch, created if needed). Returns the commit's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder).resolve()  # RUN/best is a link
    atomic_write_text(folder / "README.md", card)
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 ignore_patterns=NOT_UPLOADED, commit_message=f"refdpo {__version__}: upload model")
    except Exception as e:  # auth, network, name: one line; the local folder is complete either way
        raise hub_error(repo_id, e, " (the local folder is complete)") from None
    return str(getattr(info, "commit_url", None) or info)
