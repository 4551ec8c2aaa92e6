"""The `tapo` command: `tapo train`, `tapo eval`, `tapo coldstart`.

`tapo train [--config FILE.yaml] [--key value ...]` takes every `RunArgs` and `TAPOConfig` (GRPOConfig) field. Values
are layered: the embedded CPU default < a resumed run's saved args < the YAML file < the command line. Unknown keys
and wrong types are errors that name the key and the closest valid options; nothing is silently ignored.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import sys
import time
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration key or value that `tapo train` cannot accept."""


def _raise_config_error(message: str):
    """argparse's `error` prints the whole usage (hundreds of GRPOConfig options) and exits; we raise instead."""
    raise ConfigError(f"{message}\nEvery option: tapo train --help")


def _train_parser():
    from trl import TrlParser

    from tapo.run import RunArgs
    from tapo.trainer import TAPOConfig

    parser = TrlParser((RunArgs, TAPOConfig), prog="tapo train")
    parser.error = _raise_config_error
    return parser


def _tapo_keys() -> list[str]:
    """The options tapo adds to GRPOConfig (RunArgs and TAPOConfig's own fields): what an error message lists."""
    from dataclasses import fields

    from trl import GRPOConfig

    from tapo.run import RunArgs
    from tapo.trainer import TAPOConfig

    grpo = {f.name for f in fields(GRPOConfig)}
    return sorted({f.name for f in fields(RunArgs)} | {f.name for f in fields(TAPOConfig) if f.name not in grpo})


def _check_keys(keys, known: set[str], where: str) -> None:
    unknown = [k for k in keys if k not in known]
    if not unknown:
        return
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=4, cutoff=0.6)
        lines.append(f"  {key!r}" + (f": did you mean {', '.join(close)}?" if close else ""))
    raise ConfigError(f"unknown option(s) in {where}:\n" + "\n".join(lines)
                      + f"\nTAPO options: {', '.join(_tapo_keys())}.\nEvery option (GRPOConfig's too): tapo train --help")


def _converted(action, key: str, value, where: str):
    """One YAML value through the option's own argparse type (as if typed on the command line), or ConfigError."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    try:
        result = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as err:  # booleans: the message lists the accepted spellings
        raise ConfigError(f"{where}: {key}: {err}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {key}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from err
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of: {', '.join(map(str, action.choices))}")
    return result


def _checked_values(data: dict, parser, where: str) -> dict:
    """Keys and values of a YAML layer, checked and converted like command-line values, so a wrong type names its key
    and its file (argparse leaves non-string defaults unchecked)."""
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)  # `--no_x` shares x's dest; the first action is the typed one
    _check_keys(data, set(actions) - {"help"}, where)
    out = {}
    for key, value in data.items():
        action = actions[key]
        many = action.nargs in ("+", "*")
        if isinstance(value, dict):  # dict-valued options (model_init_kwargs, ...) go on as given, as in TRL
            out[key] = value
        elif isinstance(value, list) and not many:
            raise ConfigError(f"{where}: {key}: expected one value, got the list {value!r}")
        elif many:
            out[key] = [_converted(action, key, v, where) for v in (value if isinstance(value, list) else [value])]
        else:
            out[key] = _converted(action, key, value, where)
    return out


def _load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping of option: value, not a {type(data).__name__}")
    return data


def _yaml_value(value):
    """Parsed config values as YAML-safe scalars (TrainingArguments turns some strings into enums)."""
    return value.value if isinstance(value, enum.Enum) else value


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove `--name VALUE` / `--name=VALUE` from argv and return VALUE."""
    for i, tok in enumerate(argv):
        if tok == f"--{name}":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if tok.startswith(f"--{name}="):
            del argv[i]
            return tok.split("=", 1)[1]
    return None


def parse_train_args(argv: list[str]):
    """-> (RunArgs, TAPOConfig, explicit) where `explicit` holds the layered non-default settings (saved for resume).

    Layers, later wins: the embedded default < a resumed run's args.yaml < --config FILE < the command line. With
    --resume, the run folder must hold a complete checkpoint (checked here, before anything loads)."""
    from tapo.run import EMBEDDED_DEFAULTS, find_checkpoint

    parser = _train_parser()
    argv = list(argv)
    layered = _checked_values(EMBEDDED_DEFAULTS, parser, "tapo.run.EMBEDDED_DEFAULTS")
    resume = None
    for i, tok in enumerate(argv):
        if tok == "--resume" and i + 1 < len(argv):
            resume = argv[i + 1]
        elif tok.startswith("--resume="):
            resume = tok.split("=", 1)[1]
    if resume is not None:
        if find_checkpoint(resume) is None:
            raise ConfigError(f"--resume {resume}: no complete checkpoint (a checkpoint-N folder with trainer_state.json)")
        run_dir = _run_dir_of(Path(resume))
        saved = run_dir / "args.yaml"
        if saved.exists():
            layered.update(_checked_values(_load_yaml(saved), parser, str(saved)))
        layered["output_dir"] = str(run_dir)
    config_path = _pop_option(argv, "config")
    if config_path is not None:
        layered.update(_checked_values(_load_yaml(config_path), parser, f"config file {config_path}"))
    # Command-line spellings (--n-pos, --no_tapo_enabled) -> field names.
    dest_of = {opt[2:]: a.dest for a in parser._actions for opt in a.option_strings if opt.startswith("--")}
    cli_keys = [dest_of.get(k, k) for k in (tok[2:].split("=", 1)[0] for tok in argv if tok.startswith("--"))]
    _check_keys([k for k in cli_keys if k != "help"], {a.dest for a in parser._actions} - {"help"}, "the command line")

    parser.set_defaults_with_config(**layered)
    # The values as given, before the dataclasses post-process them (report_to "none" -> []), so they reload as given.
    given = vars(parser.parse_known_args(argv)[0])
    try:
        run, config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a dataclass rejected a value (TAPOConfig / GRPOConfig / TrainingArguments checks)
        raise ConfigError(str(err)) from err
    explicit = {k: _yaml_value(given[k]) for k in [*layered, *cli_keys] if k in given and k not in ("resume", "config")}
    if run.algorithm not in ("tapo", "grpo", "opsd"):
        raise ConfigError(f"algorithm={run.algorithm!r}: choose tapo, grpo or opsd")
    if run.algorithm != "tapo":
        config.tapo_enabled = False
    if "output_dir" not in explicit:
        config.output_dir = str(Path("runs") / f"{run.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
        explicit["output_dir"] = config.output_dir
    return run, config, explicit


def _run_dir_of(path: Path) -> Path:
    """--resume accepts the run folder or one of its checkpoint-N folders."""
    return path.parent if path.name.startswith("checkpoint-") else path


def train_main(argv: list[str]) -> int:
    """`tapo train`. Exit codes: 0 done; 2 bad options or data (one message, before any model loads); 1 a NaN/inf
    loss stopped training (the checkpoints saved so far are kept)."""
    from tapo.data import DataError
    from tapo.run import find_checkpoint, load_train_set, train
    from tapo.trainer import NonFiniteLossError

    try:
        run, config, explicit = parse_train_args(argv)
        dataset = load_train_set(run, config.seed)
    except (ConfigError, DataError) as err:
        print(f"tapo train: {err}", file=sys.stderr)
        return 2
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.resume:
        (run_dir / "args.yaml").write_text(yaml.safe_dump(explicit, sort_keys=True))
    try:
        out = train(run, config, dataset)
    except NonFiniteLossError as err:
        last = find_checkpoint(run_dir)
        kept = f"last good checkpoint: {last} (resume: tapo train --resume {run_dir})" if last else "no checkpoint yet"
        print(f"tapo train: {err}\n{kept}", file=sys.stderr)
        return 1
    from tapo.progress import folder_bytes, format_bytes

    print(f"run folder: {out} ({format_bytes(folder_bytes(out))} on disk)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tapo", description="TAPO: trajectory-augmented policy optimization.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model with TAPO / GRPO / OPSD (tapo train --help)")
    from tapo.evaluation.cli import register as register_eval

    register_eval(sub)
    from tapo.coldstart import register as register_coldstart

    register_coldstart(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
