"""The `refdpo` command.

  refdpo train [--config FILE.yaml] [--field value ...]   DPO and variants from stored reference log-probs
  refdpo score --model REF --dataset D --split S --out OUT  reference log-probs (conditional or prior) for D
  refdpo check --dataset D [--model M]                      statistics of stored log-probs; recompute a sample
  refdpo evaluate --model CKPT[,CKPT...] --dataset D         validation loss and accuracies, one table
  refdpo generate --model CKPT --prompts alpaca_eval|FILE     AlpacaEval-format outputs + degeneration counts
  refdpo judge OUTPUTS.json [...] [--table evaluate.json]     AlpacaEval 2 length-controlled win rates
  refdpo analyze tokens --models CKPT... --reference REF --dataset D   token-level log-prob shifts, EOS
  refdpo sweep --grid GRID.yaml [--dry-run]                  a grid of runs, evaluated into one table
  refdpo merge --adapter RUN/best --out DIR                  fold a LoRA run's adapter into its base model
  refdpo advise --dataset D --references NAME=C,R ...      before training: use a reference? which beta?
  refdpo tiny --out DIR                                    a tiny offline model + synthetic dataset to try it on
  refdpo demo [--quick] [--study advise] [--out DIR]       the paper's three questions (or advise's validation), CPU
  refdpo --version

Every command takes --help, --config FILE.yaml and --field value (booleans: --flag, --flag false, --no-flag).

Errors caused by input (config, data, paths) are printed as one line per problem and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from refdpo.errors import RefdpoError


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if _is_main_process() else logging.WARNING)
    from refdpo.console import quiet_third_parties

    quiet_third_parties()


def _train(argv: list[str]) -> int:
    from refdpo.commands.train import train
    from refdpo.commands.train_config import parse_train_args

    summary = train(parse_train_args(argv))
    if summary.get("dry_run"):
        from refdpo.commands.dry_run import format_report

        print(format_report(summary))
        return 0
    if _is_main_process():
        from refdpo.io import read_jsonl
        from refdpo.tables import markdown

        evaluations = [r for r in read_jsonl(f"{summary['run_dir']}/metrics.jsonl") if "val_loss" in r]
        if evaluations:
            print(markdown(evaluations, ["step", "epoch", "val_loss", "val_reward_accuracy", "val_policy_accuracy",
                                         "val_margin"]))
        val = summary["last_val"] or {}
        print(f"done: {summary['steps']} steps in {summary['run_dir']}; best val loss "
              f"{summary['best_val_loss']} at step {summary['best_step']}; last val reward accuracy "
              f"{val.get('val_reward_accuracy')}, policy accuracy {val.get('val_policy_accuracy')}")
    return 0


def _score(argv: list[str]) -> int:
    from refdpo.commands.score import ScoreConfig, score
    from refdpo.config import parse_args

    cfg = parse_args(ScoreConfig, argv, "refdpo score", "Compute a reference's summed log-probs of every "
                     "chosen and rejected response, written as two columns next to the original fields.")
    summary = score(cfg)
    if summary.get("dry_run"):
        from refdpo.commands.dry_run import format_report

        print(format_report(summary))
        return 0
    if _is_main_process():
        cov = summary["coverage"]
        print(f"scored {summary['pairs']} of {summary['rows_in']} pairs ({summary['dropped_truncated']} dropped: "
              f"response truncated away) with {cov['processes']} process(es), each row once; "
              f"{summary['tokens_per_s'] or 0:.0f} tokens/s; wrote {summary['out']} and {summary['provenance']}")
    return 0


def _check(argv: list[str]) -> int:
    from refdpo.commands.check import CheckConfig, check, format_report
    from refdpo.config import parse_args

    cfg = parse_args(CheckConfig, argv, "refdpo check", "Check the reference log-probs stored in a dataset: "
                     "statistics, provenance, and (with --model) a recomputed sample.", ignore_unknown_yaml=True)
    report = check(cfg)
    print(format_report(report))
    return 1 if report["errors"] else 0


def _evaluate(argv: list[str]) -> int:
    from refdpo.commands.evaluate import EvalConfig, evaluate, format_table
    from refdpo.config import parse_args

    cfg = parse_args(EvalConfig, argv, "refdpo evaluate", "Validation DPO loss, reward and policy accuracy (ties "
                     "count 0.5), margins, log-probs and lengths of one or more checkpoints, as one table.",
                     ignore_unknown_yaml=True)
    rows = evaluate(cfg)
    if _is_main_process():
        print(format_table(rows))
    return 0


def _generate(argv: list[str]) -> int:
    from refdpo.commands.generate import GenerateConfig, generate, summary_line
    from refdpo.config import parse_args

    cfg = parse_args(GenerateConfig, argv, "refdpo generate", "Answer AlpacaEval's prompts (or a file's) in the "
                     "training template, greedy by default; AlpacaEval JSON plus length and degeneration counts.")
    stats = generate(cfg)
    print(f"{summary_line(stats)}; wrote {cfg.out}")
    return 0


def _judge(argv: list[str]) -> int:
    from refdpo.commands.judge import JudgeConfig, judge
    from refdpo.config import parse_args
    from refdpo.tables import markdown

    files = []  # `refdpo judge a.json b.json --out DIR`: leading paths are the outputs to judge
    while argv and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    argv = (["--outputs", ",".join(files)] if files else []) + argv
    rows = judge(parse_args(JudgeConfig, argv, "refdpo judge", "AlpacaEval 2 win rates of refdpo generate "
                            "outputs (needs the alpaca_eval package and the judge's API key)."))
    print(markdown(rows))
    return 0


def _analyze(argv: list[str]) -> int:
    from refdpo.commands.analyze import AnalyzeConfig, analyze
    from refdpo.config import parse_args
    from refdpo.errors import ConfigError

    if not argv or argv[0] != "tokens":
        raise ConfigError("usage: refdpo analyze tokens --models CKPT [CKPT ...] --reference REF --dataset D")
    argv, models = argv[1:], []
    if "--models" in argv:  # --models A B C: the paths up to the next flag
        at = argv.index("--models")
        end = next((k for k in range(at + 1, len(argv)) if argv[k].startswith("-")), len(argv))
        models, argv = argv[at + 1:end], argv[:at] + argv[end:]
    argv = (["--model", ",".join(models)] if models else []) + argv
    cfg = parse_args(AnalyzeConfig, argv, "refdpo analyze tokens", "The paper's token-level analysis: per-token "
                     "log-prob differences to the reference (Figs. 1-2) and the end token (Fig. 3).")
    result = analyze(cfg)
    names = result["token_names"]
    print(f"{len(names)} token types, {result['end_tokens']} end tokens; most down-weighted: "
          + ", ".join(repr(names[t]) for t in result["top_tokens"][:5]) + f"; plots and tables in {cfg.out}")
    return 0


def _sweep(argv: list[str]) -> int:
    from refdpo.commands.sweep import SweepConfig, dry_run, load_grid, sweep
    from refdpo.config import parse_args
    from refdpo.tables import markdown

    cfg = parse_args(SweepConfig, argv, "refdpo sweep", "Train every point of a grid (beta x objective x "
                     "reference ...), evaluate each best checkpoint, one table.")
    spec = load_grid(cfg.grid)
    if cfg.dry_run:
        print("\n".join(dry_run(spec)))
        return 0
    print(markdown(sweep(spec)))
    return 0


def _merge(argv: list[str]) -> int:
    from refdpo.commands.merge import MergeConfig, merge
    from refdpo.config import parse_args

    cfg = parse_args(MergeConfig, argv, "refdpo merge", "Merge a `refdpo train --lora` checkpoint's adapter into "
                     "its base model: a plain model folder (safetensors + tokenizer + merge.json).")
    done = merge(cfg)
    lora = done["lora"]
    print(f"merged {done['adapter']} (LoRA r {lora['r']}, alpha {lora['alpha']}) into {done['base']}; wrote "
          f"{done['out']} ({done['dtype']})")
    return 0


def _advise(argv: list[str]) -> int:
    from refdpo.commands.advise import AdviseConfig, advise_split
    from refdpo.config import parse_args

    if "--references" in argv:  # --references a=x,y b=z,w: the items up to the next flag
        at = argv.index("--references")
        end = next((k for k in range(at + 1, len(argv)) if argv[k].startswith("-")), len(argv))
        argv = argv[:at] + ["--references", " ".join(argv[at + 1:end])] + argv[end:]
    cfg = parse_args(AdviseConfig, argv, "refdpo advise", "Before training: per candidate reference, use it, mix "
                     "it with the self reference, or not; which beta and mixture weight; with intervals and reasons, "
                     "from stored log-prob columns.")
    report = advise_split(cfg)
    print(report["text"])
    print(f"wrote {cfg.out}/advise.md, advise.csv, advise.json, {', '.join(report['plots'])}")
    return 0


def _tiny(argv: list[str]) -> int:
    from refdpo.config import parse_args
    from refdpo.testbed.tiny import TinyConfig, build_tiny

    cfg = parse_args(TinyConfig, argv, "refdpo tiny", "Build a tiny offline setup: a tokenizer and random-init "
                     "Llama (OUT/model) and synthetic pairs in the RefDPO schema scored by that model as its own "
                     "reference (OUT/data).")
    settings = dataclasses.asdict(cfg)
    out = build_tiny(settings.pop("out"), **settings)
    print(f"tiny setup in {out}: model {out / 'model'}, data {out / 'data'}")
    return 0


def _demo(argv: list[str]) -> int:
    from refdpo.config import parse_args
    from refdpo.testbed.demo import DemoConfig, run_demo

    cfg = parse_args(DemoConfig, argv, "refdpo demo", "The paper's three questions on a controlled task with a "
                     "known reward, through score, train and evaluate, on a CPU in minutes (refdpo/testbed/README.md).")
    report = run_demo(cfg)
    print(report["text"])
    timing = report["timing"]
    print(f"{cfg.out}: results.md/.csv/.json, {', '.join(report['plots'])}; {timing['seconds']:.0f} s with "
          f"{timing['workers']} worker(s)")
    return 0


COMMANDS = {"train": _train, "score": _score, "check": _check, "evaluate": _evaluate, "generate": _generate,
            "judge": _judge, "analyze": _analyze, "sweep": _sweep, "merge": _merge, "advise": _advise, "tiny": _tiny,
            "demo": _demo}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from refdpo import __version__

        print(f"refdpo {__version__}")
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"refdpo: error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
              "(refdpo --help)", file=sys.stderr)
        sys.exit(2)
    _setup_logging()
    from refdpo.allocator import tune_allocator

    tune_allocator()  # before any tensor exists: the CPU allocator setting that doubles small-model steps
    import refdpo.engine  # noqa: F401  (sets DS_ACCELERATOR before anything imports DeepSpeed)

    try:
        code = COMMANDS[argv[0]](argv[1:])
    except RefdpoError as e:
        if _is_main_process():
            for line in str(e).splitlines():
                print(f"refdpo {argv[0]}: error: {line}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:  # the environment failed (a full disk, a vanished folder): one line, what was written stays
        if _is_main_process():
            where = f": {e.filename}" if e.filename else ""
            print(f"refdpo {argv[0]}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if _is_main_process():
            print(f"refdpo {argv[0]}: interrupted; files are written atomically, so what was finished is kept "
                  "(train --resume, score and sweep continue where they stopped)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
