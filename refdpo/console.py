"""What a user sees while a command runs: third-party noise filtered the same way from the CLI and from the
Python API, a progress bar on a terminal but one log line every few steps when stderr is a file (a redirected
tqdm writes every refresh), and one line per evaluation."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("refdpo.progress")
LOG_EVERY_S = 30.0  # without a terminal, a bar becomes a log line at most this often


class _DropTiedWeightNotice(logging.Filter):
    """accelerate warns at every checkpoint of a model with tied embeddings that it stored them once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def quiet_third_parties() -> None:
    """Only warnings from the libraries underneath, no per-checkpoint notices or weight-loading bars (they
    would break refdpo's own bar). Idempotent; called by the CLI and by train/score/evaluate."""
    for noisy in ("transformers", "accelerate", "datasets", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    other = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _DropTiedWeightNotice) for f in other.filters):
        other.addFilter(_DropTiedWeightNotice())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def interactive() -> bool:
    """A terminal or a notebook to draw a progress bar in (else progress is logged as lines)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class _AsLogLines:
    """A file for tqdm that turns its refreshes into log lines (a redirected bar would write every one)."""

    def write(self, text: str) -> None:
        if line := text.strip("\r\n "):
            log.info(line)

    def flush(self) -> None:
        pass


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm on a terminal; elsewhere a log line at most every LOG_EVERY_S seconds, and one at the end."""
    if not interactive():
        kwargs.update(file=_AsLogLines(), mininterval=max(kwargs.get("mininterval", 0.1), LOG_EVERY_S),
                      ascii=True, dynamic_ncols=False, ncols=100)
    return tqdm(iterable, **kwargs)


def step_line(step: int, total: int, record: dict) -> str:
    """One training report as a log line (when there is no progress bar)."""
    return (f"step {step}/{total} (epoch {record['epoch']:.2f}): loss {record['loss']:.4f}, reward accuracy "
            f"{record['reward_accuracy']:.3f}, lr {record['lr']:.2e}, {record['tokens_per_s']:.0f} tokens/s")


def eval_line(step: int, epoch: float, val: dict, best: bool) -> str:
    """One evaluation as a log line."""
    return (f"eval at step {step} (epoch {epoch:.2f}): val loss {val['val_loss']:.4f}, reward accuracy "
            f"{val['val_reward_accuracy']:.3f}, policy accuracy {val['val_policy_accuracy']:.3f}, margin "
            f"{val['val_margin']:.4f}" + (" (best so far)" if best else ""))
