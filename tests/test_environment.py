"""Failures of input and environment, each in a real `python -m refdpo` process: one line naming what is wrong,
a non-zero exit, no traceback, and nothing already written changed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO, read_metrics, run_cli


def _unwritable() -> str | None:
    """A folder this process cannot write in (a read-only filesystem; root ignores permission bits)."""
    for folder in ("/sys", "/proc"):
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(probe)
    return None


READ_ONLY = _unwritable()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def case(name, args, expected, code=2, needs_read_only=False):
    marks = [pytest.mark.skipif(needs_read_only and READ_ONLY is None, reason="no read-only folder here")]
    return pytest.param(args, expected, code, id=name, marks=marks)


# {S}: the tiny setup; {T}: this test's folder; {RO}: a folder on a read-only filesystem. `expected`: the whole
# last line of stderr, a regular expression.
CASES = [
    case("unknown_command", ["frobnicate"],
         r"refdpo: error: unknown command 'frobnicate'; the commands are train, score, .* \(refdpo --help\)"),
    case("duplicate_yaml_key", ["train", "--config", "{T}/dup.yaml"],
         r"refdpo train: error: {T}/dup.yaml: invalid YAML: key 'beta' is given twice \(line 3\)"),
    case("zero_batch", ["train", "--model", "{S}/model", "--dataset", "{S}/data", "--batch_size", "0"],
         r"refdpo train: error: --batch_size must be >= 1, got 0"),
    case("missing_model", ["train", "--model", "/nope/model", "--dataset", "{S}/data"],
         r"refdpo train: error: /nope/model: no such file or folder \(the tokenizer: --tokenizer, else --model\)"),
    case("model_without_tokenizer", ["train", "--model", "{T}/weights-only", "--dataset", "{S}/data"],
         r"refdpo train: error: {T}/weights-only has no tokenizer files \(tokenizer.json, .*\): pass --tokenizer "
         r"with the folder or hub id of the model's tokenizer"),
    case("missing_dataset", ["train", "--model", "{S}/model", "--dataset", "/nope/data"],
         r"refdpo train: error: /nope/data: no such file or folder"),
    case("missing_val_split", ["train", "--model", "{S}/model", "--dataset", "{S}/data", "--val_split", "dev"],
         r"refdpo train: error: {S}/data: no split 'dev' here: expected dev.jsonl, .* \(train without evaluation "
         r"with --val_split ''\)"),
    case("output_dir_read_only", ["train", "--model", "{S}/model", "--dataset", "{S}/data", "--output_dir",
                                  "{RO}/run"],
         r"refdpo train: error: --output_dir {RO}/run: cannot write in {RO} \(.*\)", needs_read_only=True),
    case("output_dir_under_a_file", ["train", "--model", "{S}/model", "--dataset", "{S}/data", "--output_dir",
                                     "{T}/witness/file.txt/run"],
         r"refdpo train: error: --output_dir {T}/witness/file.txt/run: {T}/witness/file.txt is a file, not a "
         r"folder"),
    case("score_out_read_only", ["score", "--model", "{S}/model", "--dataset", "{S}/data", "--split", "val",
                                 "--out", "{RO}/scored/val.jsonl"],
         r"refdpo score: error: --out {RO}/scored: cannot write in {RO} \(.*\)", needs_read_only=True),
    case("evaluate_out_under_a_file", ["evaluate", "--model", "{S}/model", "--dataset", "{S}/data", "--out",
                                       "{T}/witness/file.txt/eval"],
         r"refdpo evaluate: error: --out {T}/witness/file.txt/eval: {T}/witness/file.txt is a file, not a folder"),
    case("tiny_rebuilt_otherwise", ["tiny", "--out", "{T}/witness/tiny", "--train_pairs", "10", "--val_pairs", "64"],
         r"refdpo tiny: error: {T}/witness/tiny holds a tiny setup built with --train_pairs 256 \(now 10\): pass "
         r"--overwrite to rebuild it, or another --out"),
    case("judge_missing_outputs", ["judge", "{T}/nope.json"],
         r"refdpo judge: error: {T}/nope.json: no such outputs file \(write one with refdpo generate\)"),
]


@pytest.mark.parametrize("args,expected,code", CASES)
def test_a_failure_is_one_line_and_changes_nothing(tiny_setup, tmp_path, args, expected, code):
    (tmp_path / "dup.yaml").write_text("beta: 0.1\nloss: dpo\nbeta: 0.5\n")
    (tmp_path / "weights-only").mkdir()
    shutil.copy(tiny_setup / "model" / "config.json", tmp_path / "weights-only")
    witness = tmp_path / "witness"  # what earlier commands wrote: it must come out unchanged
    witness.mkdir()
    (witness / "file.txt").write_text("kept\n")
    shutil.copytree(tiny_setup, witness / "tiny", ignore=shutil.ignore_patterns("model"))
    before = snapshot(tmp_path)
    subs = {"{S}": str(tiny_setup), "{T}": str(tmp_path), "{RO}": READ_ONLY or "/nonexistent"}

    def fill(text: str, escape: bool) -> str:
        for key, value in subs.items():
            text = text.replace(key, re.escape(value) if escape else value)
        return text

    done = run_cli([fill(a, False) for a in args], timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and lines, done.stderr[-2000:]
    assert re.fullmatch(fill(expected, True), lines[-1]), lines[-1]
    assert sum("error:" in line for line in lines) == 1, done.stderr[-2000:]
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_setup, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "refdpo", "train", "--model", str(tiny_setup / "model"), "--dataset",
            str(tiny_setup / "data"), "--output_dir", str(run), "--epochs", "3", "--batch_size", "4",
            "--save_interval", "1000", "--eval_interval", "1000", "--report_to", "none", "--max_val_pairs", "8",
            "--report_freq", "1",
            "--no-gradient_checkpointing", "--seed", "0"]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # a few steps in, far from any planned checkpoint
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    step = json.loads((run / "last" / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 192 and "Traceback" not in stderr
    assert last == (f"refdpo train: error: stopped by SIGINT at step {step} of 192, checkpoint saved; resume with: "
                    f"refdpo train --config {run.resolve()}/config.yaml --resume")
    resumed = run_cli(["train", "--config", str(run / "config.yaml"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps, _ = read_metrics(run)
    assert [s["step"] for s in steps] == list(range(1, 193))


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tiny_setup, tmp_path, monkeypatch):
    """The disk fills during the second checkpoint: one line, its temporary folder gone, `last` intact."""
    from helpers import train_config

    from refdpo import checkpoint as ckpt
    from refdpo.commands.train import train
    from refdpo.errors import RefdpoError

    real, calls = ckpt.save_state, []

    def fill_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_state", fill_up)
    run = tmp_path / "run"
    with pytest.raises(RefdpoError) as full:
        train(train_config(tiny_setup, run, max_train_pairs=32, batch_size=4, save_interval=2, val_split=""))
    assert str(full.value) == (f"cannot save the checkpoint of step 4 in {run}: No space left on device; `last` "
                               "still points to step-0000002, resume from it with --resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert (run / "last").resolve().name == "step-0000002"
