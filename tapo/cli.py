"""The `tapo` command: `tapo train`, `tapo eval`, `tapo coldstart`.

`tapo train [--config FILE.yaml] [--key value ...]` takes every `RunArgs` and `TAPOConfig` (GRPOConfig) field, and
`OPSDConfig`'s with `--algorithm opsd`. Values
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


def _train_parser(algorithm: str = "opsd"):
    """The parser of `tapo train --algorithm ALGORITHM`; the default, OPSD's, knows every option of every algorithm."""
    from trl import TrlParser

    from tapo.run import RunArgs, config_class

    parser = TrlParser((RunArgs, config_class(algorithm)), prog="tapo train")
    parser.error = _raise_config_error
    return parser


def _own_fields(cls, base=None) -> set[str]:
    """The field names `cls` adds to the dataclass `base` (all of its fields without one)."""
    from dataclasses import fields

    return {f.name for f in fields(cls)} - ({f.name for f in fields(base)} if base else set())


def _tapo_keys() -> list[str]:
    """The options tapo adds to GRPOConfig (RunArgs, TAPOConfig and OPSDConfig fields): what an error message lists."""
    from trl import GRPOConfig

    from tapo.opsd import OPSDConfig
    from tapo.run import RunArgs

    return sorted(_own_fields(RunArgs) | _own_fields(OPSDConfig, GRPOConfig))


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


def _find_option(argv: list[str], name: str) -> tuple[str | None, slice]:
    """(VALUE, the slice of argv it takes) of the last `--name VALUE` / `--name=VALUE`, or (None, empty slice)."""
    found = None, slice(0, 0)
    for i, tok in enumerate(argv):
        if tok == f"--{name}":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            found = argv[i + 1], slice(i, i + 2)
        elif tok.startswith(f"--{name}="):
            found = tok.split("=", 1)[1], slice(i, i + 1)
    return found


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove `--name VALUE` / `--name=VALUE` from argv and return VALUE."""
    value, where = _find_option(argv, name)
    del argv[where]
    return value


def parse_train_args(argv: list[str]):
    """-> (RunArgs, the algorithm's config, explicit): TAPOConfig, or OPSDConfig for `--algorithm opsd`; `explicit` holds
    the layered non-default settings (saved for resume).

    Layers, later wins: the embedded default < a resumed run's args.yaml < --config FILE < the command line. With
    --resume, the run folder must hold a complete checkpoint (checked here, before anything loads)."""
    import torch.distributed
    from accelerate.utils import broadcast_object_list

    from tapo.config import EMBEDDED_DEFAULTS
    from tapo.opsd import OPSDConfig
    from tapo.run import ALGORITHMS
    from tapo.runfolder import ARGS_FILE, resume_point

    parser = _train_parser()
    argv = list(argv)
    layered = _checked_values(EMBEDDED_DEFAULTS, parser, "tapo.config.EMBEDDED_DEFAULTS")
    resume = _find_option(argv, "resume")[0]
    if resume is not None:
        try:
            run_dir = resume_point(resume)[0]
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from err
        saved = run_dir / ARGS_FILE
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

    algorithm = _find_option(argv, "algorithm")[0] or layered.get("algorithm", "tapo")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r}: choose {', '.join(ALGORITHMS[:-1])} or {ALGORITHMS[-1]}")
    if algorithm != "opsd" and not {"-h", "--help"} & set(argv):  # --help shows every algorithm's options
        from tapo.config import TAPOConfig

        misplaced = sorted(_own_fields(OPSDConfig, TAPOConfig) & {*layered, *cli_keys})
        if misplaced:
            raise ConfigError(f"{', '.join(misplaced)}: OPSD option(s), they need --algorithm opsd (got {algorithm})")
        parser = _train_parser(algorithm)
    # TAPO off before the config checks run: they refuse, with TAPO on, TRL options that plain GRPO allows.
    parser.set_defaults_with_config(**layered, **({"tapo_enabled": False} if algorithm != "tapo" else {}))
    # The values as given, before the dataclasses post-process them (report_to "none" -> []), so they reload as given.
    given = vars(parser.parse_known_args(argv)[0])
    try:
        run, config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a dataclass rejected a value (TAPOConfig / OPSDConfig / GRPOConfig checks)
        raise ConfigError(str(err)) from err
    explicit = {k: _yaml_value(given[k]) for k in [*layered, *cli_keys] if k in given and k not in ("resume", "config")}
    if run.algorithm != "tapo":
        config.tapo_enabled = False
    if "output_dir" not in explicit:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if torch.distributed.is_initialized():  # (set up by TrainingArguments) ranks may straddle a second: use rank 0's
            stamp = broadcast_object_list([stamp], from_process=0)[0]
        config.output_dir = str(Path("runs") / f"{run.algorithm}-{stamp}")
        explicit["output_dir"] = config.output_dir
    return run, config, explicit


def train_main(argv: list[str]) -> int:
    """`tapo train`. Exit codes: 0 done; 2 bad options or data (one message, before any model loads); 1 a NaN/inf
    loss stopped training (the checkpoints saved so far are kept)."""
    from tapo.data import DataError
    from tapo.ranks import is_main_process
    from tapo.run import load_train_set, train
    from tapo.runfolder import find_checkpoint, write_args
    from tapo.trainer_base import NonFiniteLossError

    try:
        run, config, explicit = parse_train_args(argv)
        dataset = load_train_set(run, config.seed)
    except (ConfigError, DataError) as err:
        print(f"tapo train: {err}", file=sys.stderr)
        return 2
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.resume and is_main_process():
        write_args(run_dir, explicit)
    try:
        out = train(run, config, dataset)
    except NonFiniteLossError as err:
        last = find_checkpoint(run_dir)
        kept = f"last good checkpoint: {last} (resume: tapo train --resume {run_dir})" if last else "no checkpoint yet"
        print(f"tapo train: {err}\n{kept}", file=sys.stderr)
        return 1
    if is_main_process():
        from tapo.progress import folder_bytes, format_bytes

        print(f"run folder: {out} ({format_bytes(folder_bytes(out))} on disk)")
    return 0


def version_line() -> str:
    """`tapo --version`: this package's version and the libraries a bug report needs."""
    from importlib.metadata import version

    from tapo.version import __version__

    return f"tapo-rl {__version__} ({', '.join(f'{lib} {version(lib)}' for lib in ('trl', 'transformers', 'torch'))})"


def main(argv: list[str] | None = None) -> int:
    from tapo.collision import collision_message, foreign_tapo

    found = foreign_tapo([str(Path(__file__).parent)])  # tapo.__path__; again here: the other package's __init__ may have replaced ours
    if found is not None:
        print(f"tapo: {collision_message(found)}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # answered before the subcommands below import torch (seconds); --help lists it too
        print(version_line())
        return 0
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tapo", description="TAPO: trajectory-augmented policy optimization.")
    parser.add_argument("--version", action="version", version=version_line())
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
