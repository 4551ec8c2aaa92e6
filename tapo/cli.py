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


def _train_parser():
    from trl import TrlParser

    from tapo.run import RunArgs
    from tapo.trainer import TAPOConfig

    return TrlParser((RunArgs, TAPOConfig), prog="tapo train")


def _known_keys(parser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def _check_keys(keys, known: set[str], where: str) -> None:
    unknown = [k for k in keys if k not in known]
    if not unknown:
        return
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=4, cutoff=0.6)
        lines.append(f"  {key!r}" + (f": did you mean {', '.join(close)}?" if close else ""))
    tapo_keys = ", ".join(sorted(k for k in known if k in _TAPO_KEYS))
    raise ConfigError(f"unknown option(s) in {where}:\n" + "\n".join(lines)
                      + f"\nTAPO options: {tapo_keys}.\nAll options (every GRPOConfig field too): tapo train --help")


_TAPO_KEYS = {"model", "dataset", "n_train", "algorithm", "resume", "tapo_enabled", "n_pos", "n_neg", "m_max",
              "ref_loss_weight", "ref_baseline", "ots_enabled", "ots_low", "ots_high", "constructor",
              "synthesis_max_tokens", "teacher_model", "teacher_base_url", "skip_bad_rows", "ref_loss_aggregation"}


def _as_default(value):
    """YAML scalars become strings so argparse's own type conversion validates them exactly like CLI values."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    return value


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
        raise ConfigError(f"config file {path} must be a YAML mapping of option: value")
    return data


def _yaml_value(value):
    """Parsed config values as YAML-safe scalars (TrainingArguments turns some strings into enums)."""
    return value.value if isinstance(value, enum.Enum) else value


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove `--name VALUE` / `--name=VALUE` from argv and return VALUE."""
    for i, tok in enumerate(argv):
        if tok == f"--{name}":
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if tok.startswith(f"--{name}="):
            del argv[i]
            return tok.split("=", 1)[1]
    return None


def parse_train_args(argv: list[str]):
    """-> (RunArgs, TAPOConfig, explicit) where `explicit` holds the layered non-default settings (saved for resume)."""
    from tapo.run import EMBEDDED_DEFAULTS

    parser = _train_parser()
    known = _known_keys(parser)
    argv = list(argv)
    layered = dict(EMBEDDED_DEFAULTS)
    resume = None
    for i, tok in enumerate(argv):
        if tok == "--resume" and i + 1 < len(argv):
            resume = argv[i + 1]
        elif tok.startswith("--resume="):
            resume = tok.split("=", 1)[1]
    if resume is not None:
        run_dir = _run_dir_of(Path(resume))
        saved = run_dir / "args.yaml"
        if saved.exists():
            layered.update(_load_yaml(saved))
        layered["output_dir"] = str(run_dir)
    config_path = _pop_option(argv, "config")
    if config_path is not None:
        from_file = _load_yaml(config_path)
        _check_keys(from_file, known, f"config file {config_path}")
        layered.update(from_file)
    cli_keys = [tok[2:].split("=", 1)[0] for tok in argv if tok.startswith("--")]
    _check_keys([k for k in cli_keys if k != "help"], known, "the command line")

    parser.set_defaults_with_config(**{k: _as_default(v) for k, v in layered.items()})
    run, config = parser.parse_args_into_dataclasses(args=argv)
    explicit = {k: _yaml_value(getattr(run, k) if hasattr(run, k) else getattr(config, k)) for k in [*layered, *cli_keys]
                if k not in ("resume", "config") and (hasattr(run, k) or hasattr(config, k))}
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
    from tapo.run import train

    try:
        run, config, explicit = parse_train_args(argv)
    except ConfigError as err:
        print(f"tapo train: {err}", file=sys.stderr)
        return 2
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.resume:
        (run_dir / "args.yaml").write_text(yaml.safe_dump(explicit, sort_keys=True))
    out = train(run, config)
    print(f"run folder: {out}")
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
    try:
        from tapo.coldstart import register as register_coldstart
    except ImportError:
        register_coldstart = None
    if register_coldstart is not None:
        register_coldstart(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
