"""The `tapo eval` subcommand: `register(subparsers)` adds it to the main parser of tapo/cli.py."""

import argparse
import inspect

from rich.console import Console
from rich.table import Table

from tapo.data import DataError
from tapo.evaluation.benchmarks import DEFAULT_BENCHMARKS
from tapo.evaluation.compare import compare_runs, comparison_table, headline, show
from tapo.evaluation.errors import EvalConfigError
from tapo.evaluation.generate import BACKENDS
from tapo.evaluation.runner import default_run_dir, evaluate

# The CLI's defaults are evaluate()'s, read off its signature so the two cannot drift apart.
DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(evaluate).parameters.items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="sample k answers per problem on math benchmarks; report pass@k, DSR, ERR",
        description="Evaluate a model on AIME24/AIME25/HMMT25 or local files, or compare two finished runs. "
        "Runs are resumable: rerun the same command to continue an interrupted one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="model name (e.g. tiny, smollm2-135m), hub id or local path")
    parser.add_argument(
        "--benchmarks",
        help=f"comma-separated names ({', '.join(DEFAULT_BENCHMARKS)}) or .jsonl/.parquet files "
        f"(default: all three, or only the --data files when given)",
    )
    parser.add_argument("--data", action="append", default=[], metavar="FILE", help="local benchmark file (repeatable)")
    parser.add_argument("--k", type=int, default=DEFAULTS["k"], help="samples per problem")
    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULTS["backend"], help="auto: vllm when usable")
    parser.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"])
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
    parser.add_argument("--top-p", type=float, default=DEFAULTS["top_p"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="sequences per generate() call")
    parser.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    parser.add_argument("--out", help="run folder (default runs/eval/<model>); with --compare, where compare.md goes")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two run folders instead")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    console = Console()
    try:
        if args.compare:
            comparison = compare_runs(*args.compare, out=args.out)
            console.print(comparison_table(comparison))
            console.print(f"wrote {comparison['out']}/compare.md")
            return 0
        if not args.model:
            raise EvalConfigError("--model is required (or --compare RUN_A RUN_B)")
        named = args.benchmarks.split(",") if args.benchmarks else ([] if args.data else list(DEFAULT_BENCHMARKS))
        out = args.out or default_run_dir(args.model)
        summary = evaluate(
            args.model,
            [name.strip() for name in named if name.strip()] + args.data,
            args.k,
            backend=args.backend,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            limit=args.limit,
            out=out,
            seed=args.seed,
        )
    except (DataError, EvalConfigError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    console.print(summary_table(summary))
    console.print(f"wrote {out}/report.md")
    return 0


def summary_table(summary: dict) -> Table:
    """One row per benchmark with the headline metrics of compare.headline."""
    table = Table(title=f"{summary['model']} (k={summary['k']})")
    rows = {name: headline(bench, max(map(int, bench["pass@k"]))) for name, bench in summary["benchmarks"].items()}
    columns = list(next(iter(rows.values())))
    for column in ["benchmark", *columns]:
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    for name, metrics in rows.items():
        table.add_row(name, *(show(metric, value) for metric, value in metrics.items()))
    return table
