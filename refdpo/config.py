"""Configuration: `option()` (a field's default and help, one source for both), `Config` (what every
command's settings share: coerced and checked on construction, from code, YAML or flags alike), the specs
several commands share (ModelSpec, DataSpec, InferenceSpec, ObjectiveSpec, LayoutSpec), and parsing.

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags. Every field is a flag
(`--max_lr 1e-6`, also spelled `--max-lr`); booleans take `--flag`, `--flag true|false|1|0` and `--no-flag`.
A config class may declare other tools' names for its fields (`ALIASES`: TRL's and transformers' names, the
flags of RefDPO's released code); they work as flags and as YAML keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from refdpo.core.objectives import OBJECTIVES, Objective
from refdpo.data.pairs import ON_TRUNCATED
from refdpo.data.schema import DEFAULT_REF_COLUMNS
from refdpo.data.templates import DEFAULT_TEMPLATE, TEMPLATES
from refdpo.errors import ConfigError, first_line

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
INFERENCE_DTYPES = ("auto", *WEIGHT_DTYPES)  # auto: bfloat16 on a GPU that has it, else float32


def option(default, help: str, **kw):
    """A config field: its default and its --help text (one source for both)."""
    return field(default=default, metadata={"help": help, **kw})


class Config:
    """The base of every command's settings (a dataclass). Constructed from code, YAML or flags, its fields
    are coerced to their types and checked by `validate()`, with the messages the command line gives:
    `TrainConfig(beta=-1)` raises "--beta must be a positive number".

    REQUIRED: {field: message} for inputs that must be given before the command runs (`require()`: a field
    given as an object instead, like a loaded model, is exempt); a subclass maps a field to None to lift it.
    ALIASES: {group: {flag: (field, value as a bare switch, or None when it takes a value)}}; a field of None
    is a flag accepted and ignored.
    """

    REQUIRED: ClassVar[dict[str, str | None]] = {}
    ALIASES: ClassVar[dict[str, dict[str, tuple[str | None, object]]]] = {}

    def __post_init__(self) -> None:
        source = type(self).__name__
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(type(self), f.name, getattr(self, f.name), source))
        self.validate()

    def validate(self):
        return self

    def require(self, *given: str):
        """Raise a ConfigError for the first required input that is empty (`given`: supplied otherwise)."""
        for name, message in _merged(type(self), "REQUIRED").items():
            if message is not None and name not in given and not getattr(self, name):
                raise ConfigError(message)
        return self


def _merged(cls: type, attribute: str) -> dict:
    """A class attribute's dicts merged along the inheritance chain (the subclass wins)."""
    merged: dict = {}
    for klass in reversed(cls.__mro__):
        for key, value in vars(klass).get(attribute, {}).items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


def aliases(cls: type) -> dict[str, tuple[str | None, object]]:
    """{flag: (field, switch value)} of every alias group of `cls`."""
    return {flag: target for group in _merged(cls, "ALIASES").values() for flag, target in group.items()}


@dataclass
class ModelSpec(Config):
    """Which model and tokenizer to load (shared by train, score and check)."""

    REQUIRED: ClassVar = {"model": "--model is required"}
    ALIASES: ClassVar = {"TRL and transformers": {"--model_name_or_path": ("model", None)}}

    model: str = option("", "hub id or local folder (train; RefDPO: --model_type)")
    revision: str | None = option(None, "model revision (branch, tag or commit) on the hub")
    tokenizer: str | None = option(None, "tokenizer id/folder when it differs from the model's")
    attn_implementation: str = option("auto", "auto (flash_attention_2 when installed on GPU, else sdpa) | sdpa | "
                                          "eager | flash_attention_2")
    trust_remote_code: bool = option(False, "allow model/tokenizer code from the hub")


@dataclass
class DataSpec(Config):
    """Where the pairs are and how they become tokens (shared by train, score and check)."""

    REQUIRED: ClassVar = {"dataset": "--dataset is required"}
    ALIASES: ClassVar = {"TRL and transformers": {"--dataset_name": ("dataset", None),
                                                  "--max_length": ("max_len", None)}}

    dataset: str = option("", "hub id (yale-nlp/RefDPO), folder, .jsonl/.parquet file, or save_to_disk folder")
    dataset_config: str | None = option(None, "hub config, e.g. mistral, tulu2, mistral_prior, mistralv2, llama3 "
                                          "(RefDPO: --data_split)")
    dataset_revision: str | None = option(None, "dataset revision on the hub")
    template: str = option(DEFAULT_TEMPLATE, f"chat format: {' | '.join(TEMPLATES)} (RefDPO --insert_eos = zephyr)")
    max_len: int = option(2048, "tokens per sequence; longer sequences are truncated at the end")
    on_truncated: str = option("drop", f"pairs whose response is truncated away: {' | '.join(ON_TRUNCATED)}")
    cache_dir: str = option("", "where tokenised splits are cached ('': $REFDPO_CACHE, else ~/.cache/refdpo; "
                                "none: no cache)")

    def spec_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}"),
            (self.on_truncated in ON_TRUNCATED, f"--on_truncated must be one of {', '.join(ON_TRUNCATED)}"),
            (self.max_len > 1, "--max_len must be > 1"),
        ]


BACKENDS = ("hf", "vllm")


@dataclass
class InferenceSpec(Config):
    """How a frozen model runs (shared by score and generate)."""

    dtype: str = option("auto", "auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16 | float16")
    device_map: str | None = option(None, "auto: spread one model too large for a GPU over all GPUs (one process)")
    backend: str = option("hf", f"{' | '.join(BACKENDS)} (vllm: needs the vllm package)")
    tensor_parallel_size: int = option(1, "GPUs per model with --backend vllm")

    def inference_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}"),
            (self.dtype in INFERENCE_DTYPES, f"--dtype must be {' | '.join(INFERENCE_DTYPES)}"),
            (self.device_map in (None, "auto"), "--device_map takes auto"),
            (self.tensor_parallel_size >= 1, "--tensor_parallel_size must be >= 1"),
        ]


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise a ConfigError with the first failed check's message."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class ObjectiveSpec(Config):
    """The objective, its KL strength and which stored reference it compares with (train and evaluate)."""

    loss: str = option("dpo", f"objective: {' | '.join(OBJECTIVES)}")
    beta: float = option(0.1, "KL strength beta (SimPO: reward scale)")
    ref_free: bool = option(False, "reference-free: the reference term is 0 (the paper's posterior reward)")
    label_smoothing: float = option(0.0, "cDPO label-flip probability (loss cdpo)")
    simpo_gamma: float = option(0.5, "SimPO target margin gamma")
    dpo_weight: float = option(1.0, "constant factor on the loss (RefDPO's --dpo_weight)")
    ref_columns: str = option(",".join(DEFAULT_REF_COLUMNS), "reference log-prob columns CHOSEN,REJECTED; with "
                              "--ref_mix four: REF_CHOSEN,REF_REJECTED,SELF_CHOSEN,SELF_REJECTED")
    ref_mix: float | None = option(None, "train against the geometric mixture of the two --ref_columns pairs: "
                                         "log p = ref_mix * REF + (1 - ref_mix) * SELF, exact from the columns "
                                         "(0: the second pair alone, 1: the first; `refdpo advise` recommends it)")

    @property
    def objective(self) -> Objective:
        return Objective(self.loss, self.beta, self.ref_free, self.label_smoothing, self.simpo_gamma,
                         self.dpo_weight)

    def objective_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.loss in OBJECTIVES, f"--loss must be one of {', '.join(OBJECTIVES)}"),
            (self.beta > 0 and math.isfinite(self.beta), "--beta must be a positive number"),
            (0 <= self.label_smoothing < 0.5, "--label_smoothing must be in [0, 0.5)"),
            (self.loss != "cdpo" or self.label_smoothing > 0, "--loss cdpo needs --label_smoothing > 0"),
            *self._mix_checks(),
        ]

    def _mix_checks(self) -> list[tuple[bool, str]]:
        pairs = len([c for c in self.ref_columns.split(",") if c.strip()]) // 2
        if self.ref_mix is None:
            return [(pairs <= 1, "four --ref_columns are two reference pairs: say how to mix them with --ref_mix")]
        return [(self.objective.uses_reference, "--ref_mix needs a reference (not --ref_free or --loss simpo)"),
                (0 <= self.ref_mix <= 1, "--ref_mix must be in [0, 1]"),
                (pairs == 2, "--ref_mix needs four --ref_columns: REF_CHOSEN,REF_REJECTED,SELF_CHOSEN,SELF_REJECTED")]


@dataclass
class LayoutSpec(Config):
    """How a batch's sequences are laid out in rows (train and evaluate; core/verify.py picks it)."""

    packing: bool = option(True, "pack each micro-batch's sequences into rows without padding (position ids restart "
                                 "per sequence; checked against the padded layout at start-up)")
    pack_capacity: int = option(0, "tokens per packed row (0: all in one row with flash-attention, else the "
                                   "micro-batch's longest sequence: a CPU's dense mask grows with the row squared)")

    def layout_checks(self) -> list[tuple[bool, str]]:
        return [(self.pack_capacity >= 0, "--pack_capacity must be >= 0")]


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args else t
    return out


def _parse_int(text: str) -> int:
    """An integer; "3.0" too (transformers' scripts write `--num_train_epochs 3.0`)."""
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if number.is_integer():
            return int(number)
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


class _Bool(argparse.Action):
    """`--flag` (true), `--flag VALUE` (true/false, 1/0, yes/no, on/off) and `--no-flag` (false)."""

    def __init__(self, option_strings, dest, **kwargs):
        negatives = [f"--no-{o[2:]}" for o in option_strings if o.startswith("--")]
        super().__init__([*option_strings, *negatives], dest, nargs="?", type=_parse_bool, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value")
            value = False
        setattr(namespace, self.dest, True if value is None else value)


class _Switch(argparse.Action):
    """An alias that sets a field to a fixed value (`--insert_eos` = `--template zephyr`, `--bf16` =
    `--mixed_precision bf16`); `--bf16 false`, as transformers' scripts write it, sets nothing."""

    def __init__(self, option_strings, dest, switch_value, **kwargs):
        # Not argparse's `const`: it would go through `type` when the flag comes bare.
        super().__init__(option_strings, dest, nargs="?", type=_parse_bool, **kwargs)
        self.switch_value = switch_value

    def __call__(self, parser, namespace, value, option_string=None):
        if value is None or value:
            setattr(namespace, self.dest, self.switch_value)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the usage of a command with 80 flags is a screenful): `--help` has it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str, cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of the dataclass `cls` (`--name` and `--name-with-dashes`), its aliases, `--config`."""
    parser = _Parser(prog=prog, allow_abbrev=False, description=description)
    parser.add_argument("--config", help="YAML file of field: value (flags given here override it)")
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kind = types[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats with %
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=_Bool, default=argparse.SUPPRESS, help=help_text,
                                metavar="BOOL")
        else:
            parser.add_argument(*flags, dest=f.name, type=_parse_int if kind is int else kind,
                                default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper())
    for group_name, group in _merged(cls, "ALIASES").items():
        section = parser.add_argument_group(f"aliases: {group_name}")
        for flag, (dest, switch_value) in group.items():
            if dest is None:
                section.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                                     dest=f"_ignored{flag}", help="accepted for compatibility; no effect")
            elif types[dest] is bool:
                section.add_argument(flag, dest=dest, action=_Bool, default=argparse.SUPPRESS,
                                     help=f"= --{dest}", metavar="BOOL")
            elif switch_value is not None:
                section.add_argument(flag, action=_Switch, switch_value=switch_value, dest=dest,
                                     default=argparse.SUPPRESS, help=f"= --{dest} {switch_value}", metavar="BOOL")
            else:
                kind = types[dest]
                section.add_argument(flag, dest=dest, type=_parse_int if kind is int else kind,
                                     default=argparse.SUPPRESS, help=f"= --{dest}", metavar=dest.upper())
    return parser


class _UniqueKeys(yaml.SafeLoader):
    """safe_load that refuses a key given twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeys) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _coerce(cls: type, name: str, value: object, source: str) -> object:
    kind = _field_types(cls)[name]
    if value is None:
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        if default is None:
            return None
        raise ConfigError(f"{source}: field '{name}' cannot be null")
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise TypeError(value)  # no silent True -> 1 or 2.5 -> 2
        if kind is float and isinstance(value, str):
            return float(value)  # YAML reads 5e-7 (no dot) as a string
        return kind(value) if not isinstance(value, kind) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: field '{name}' must be {kind.__name__}, got {value!r}") from None


def coerce_fields(values: dict, source: str, cls: type, ignore_unknown: bool = False) -> dict:
    """Check names and types of `values` (from YAML or code); errors name the source and the field. Aliases
    (`learning_rate: 1e-6`) become their fields. `ignore_unknown`: drop fields `cls` does not have (a command
    reading the training config's YAML)."""
    names = {f.name for f in dataclasses.fields(cls)}
    resolved: dict = {}
    for key, value in values.items():
        target = aliases(cls).get(f"--{key}")
        if key in names or target is None:
            resolved[key] = value
        elif target[0] is not None:  # an ignored alias is dropped
            dest, switch_value = target
            if switch_value is None or _field_types(cls)[dest] is bool:
                resolved[dest] = value
            elif _coerce_bool(value, source, key):
                resolved[dest] = switch_value
    unknown = sorted(set(resolved) - names)
    if unknown and not ignore_unknown:
        raise ConfigError(f"{source}: unknown field(s): {', '.join(unknown)}")
    return {k: _coerce(cls, k, v, source) for k, v in resolved.items() if k in names}


def _coerce_bool(value: object, source: str, name: str) -> bool:
    try:
        return value if isinstance(value, bool) else _parse_bool(value)
    except argparse.ArgumentTypeError:
        raise ConfigError(f"{source}: field '{name}' must be bool, got {value!r}") from None


def from_dict(values: dict, cls: type, source: str = "config"):
    return cls(**coerce_fields(values, source, cls))


def parse_args(cls: type, argv: list[str] | None, prog: str, description: str | None = None,
               ignore_unknown_yaml: bool = False, require: bool = True):
    """defaults < YAML (--config) < flags, for the config dataclass `cls`; returns it validated (and, with
    `require`, with its required inputs given)."""
    args = vars(build_parser(prog, cls, description).parse_args(argv))
    path = args.pop("config", None)
    values = coerce_fields(load_yaml(path), str(path), cls, ignore_unknown_yaml) if path else {}
    values.update({k: v for k, v in args.items() if not k.startswith("_ignored")})
    config = cls(**values)
    return config.require() if require else config


def save_yaml(config, path: Path) -> None:
    """The resolved config, loadable again with --config."""
    from refdpo.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
