"""`urlvr` command line: train, validate, serve, schema, list, rewards, plot, sweep, probe, mcs.

Errors a user can fix (bad recipe, missing file, bad data) print as one line naming the file and
field, exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import yaml

from urlvr.commands.listing import listing, registered_elsewhere
from urlvr.commands.mcs import format_table, run_mcs
from urlvr.commands.probe import print_table, run_probe
from urlvr.commands.serve import run_server
from urlvr.rollout.server_engine import KEY_VARIABLE
from urlvr.commands.sweep import launch_lines, load_sweep, run_sweep, validate_points
from urlvr.data.loaders import DataError
from urlvr.dist import close_distributed
from urlvr.metrics.plots import plot_runs
from urlvr.recipe import Recipe, RecipeError, load_recipe
from urlvr.recipe.load import read_recipe_source
from urlvr.rewards.base import REWARDS, describe_reward
from urlvr.trainer.run import train


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="urlvr", description="GRPO trainer for unsupervised RL with verifiable rewards")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    # the deepspeed launcher puts --local_rank=N right after the program, before the command
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(cmd: argparse.ArgumentParser, set_help: str | None = None) -> argparse.ArgumentParser:
        # SUPPRESS: an absent sub-command flag must not reset `urlvr --debug CMD` to False
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if set_help:
            cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                             help=set_help)
        return cmd

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("recipe", help="recipe YAML file")
        return common(cmd, "override a recipe field (repeatable); the value is parsed as YAML")

    train = recipe_command("train", "train with GRPO")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest complete checkpoint")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # torchrun-style launchers
    recipe_command("validate", "check a recipe and print it resolved")
    serve = recipe_command("serve", "run a generation server for trainers with rollout.engine: server (docs/async.md)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; another needs "
                       "URLVR_SERVER_KEY)")
    serve.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0 = any free one)")
    serve.add_argument("--threads", type=_positive_int, help="CPU threads for the server (torch.set_num_threads)")
    serve.add_argument("--exit-with-clients", action="store_true", help=argparse.SUPPRESS)  # a server urlvr started
    serve.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    sub.add_parser("schema", help="print the recipe's JSON schema")
    listed = sub.add_parser("list", help="list every registered part (rewards, losses, engines, ...), or those of one kind")
    listed.add_argument("kind", nargs="?", metavar="KIND", help="a kind: its registry key (policy_loss) or a word of it, "
                        "plural or not (rewards, losses, advantages, engines, sources, filters, ...)")
    rewards = sub.add_parser("rewards", help="list registered rewards, or describe one: its whole docstring and knobs")
    rewards.add_argument("name", nargs="?", metavar="NAME", help="a registered reward: print its docstring and its "
                         "knobs (name, type, default) from its signature")
    plot = sub.add_parser("plot", help="PNG figures of training dynamics from run directories (overlaid)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots of the first run)")
    common(plot)
    sweep = sub.add_parser("sweep", help="run (or --print the launch lines of) a grid of overrides over one recipe, then overlay the runs")
    sweep.add_argument("spec", help="sweep spec YAML (recipe + grid), or a recipe YAML with --grid")
    sweep.add_argument("--grid", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
                       help="add an axis (repeatable); each value is parsed as YAML")
    sweep.add_argument("--recipe", help="sweep this recipe instead of the spec's")
    sweep.add_argument("--out", help="folder of the per-point run directories (default: <recipe output_dir>/<spec name>)")
    sweep.add_argument("--print", dest="print_only", action="store_true",
                       help="print one launch line per point and the plot line; run nothing")
    sweep.add_argument("--launcher", default="urlvr", help="command the printed lines start with, e.g. "
                       "'torchrun --nproc_per_node 8 -m urlvr.cli' (default: urlvr)")
    common(sweep, "override a field in every point (repeatable)")
    probe = sub.add_parser("probe", help="how well each reward agrees with correctness on each model's own samples")
    probe.add_argument("models", nargs="+", metavar="MODEL", help="model directories or hub ids (urlvr/tiny, ...)")
    probe.add_argument("--recipe", help="base recipe YAML (data, template, sampling, extractor)")
    probe.add_argument("--reward", dest="rewards", action="append", default=[], metavar="NAME",
                       help="a reward to score (repeatable; default: every registered reward that applies; the others are listed with why)")
    probe.add_argument("--prompts", type=_positive_int, default=64, help="prompts to sample (default 64)")
    probe.add_argument("--group-size", type=_positive_int,
                       help="samples per prompt (default: the recipe's rollout.group_size)")
    probe.add_argument("--out", default="runs/probe", help="folder for probe.json, probe.csv, <model>.png (default runs/probe)")
    probe.add_argument("--overwrite", action="store_true",
                       help="replace an earlier probe's files in --out (refused otherwise); other files stay")
    probe.add_argument("--rank", action="store_true",
                       help="print each model's rewards best first (top-reward acc, then AUROC in group), with the rule")
    common(probe, "override a recipe field (repeatable)")
    mcs = sub.add_parser("mcs", help="rank models by prior: Model Collapse Step of a majority-vote diagnostic run")
    mcs.add_argument("models", nargs="+", metavar="MODEL", help="model directories or hub ids")
    mcs.add_argument("--recipe", help="base recipe YAML (data, lengths, lr, ...); the diagnostic settings go on top")
    mcs.add_argument("--steps", type=int, default=200, help="step cap per model (default 200)")
    mcs.add_argument("--out", default="runs/mcs", help="folder for the runs, mcs.csv and mcs.json (default runs/mcs)")
    mcs.add_argument("--label-free", action="store_true", help="ignore labels: stop at the first label-free alarm")
    mcs.add_argument("--overwrite", action="store_true",
                     help="delete an earlier mcs's tables and run directories in --out first (refused otherwise)")
    common(mcs, "override a field of the diagnostic recipe (repeatable), applied last")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class Terminated(KeyboardInterrupt):
    """A SIGTERM (`kill`, `timeout`, a scheduler's preemption), raised where the program is, so that
    the run ends as on Ctrl-C: trackers closed (wandb marks the run finished, not crashed), a
    generation server stopped, and the line that says how to resume."""


def _terminate_like_ctrl_c(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _handles_sigterm(command: str) -> bool:
    """Only `train` in a process no launcher started. A launcher's ranks keep the default: a rank
    blocked in a collective would run a Python handler only once the collective returns, and
    their launcher stops them with SIGTERM (then SIGKILL) whatever they are doing. So does
    `urlvr serve`: the trainer that started it stops it with SIGTERM, at once, and it has nothing
    to resume."""
    return command == "train" and "RANK" not in os.environ and threading.current_thread() is threading.main_thread()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c) if _handles_sigterm(args.command) else None
    try:
        return _run(args)
    except KeyboardInterrupt as stop:
        how, code = ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        print(f"urlvr: {how}; the last complete checkpoint is intact: continue with --resume <output_dir> (a run "
              "stopped before its first checkpoint has none: delete its folder to start over)", file=sys.stderr)
        return code
    except BrokenPipeError:  # `urlvr schema | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, (RecipeError, DataError, FileNotFoundError)):
            print(f"urlvr: error: {err}", file=sys.stderr)
            return 2
        print(f"urlvr: {type(err).__name__}: {err}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _quiet_libraries() -> None:
    """The console shows urlvr's lines and its one progress bar: transformers' per-call bars
    (loading weights, writing shards) are switched off through its own setting."""
    from transformers.utils import logging as transformers_logging  # heavy (seconds): only commands that load a model

    transformers_logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    if args.command in ("train", "mcs", "sweep", "probe"):
        _quiet_libraries()
    if args.command == "schema":
        print(json.dumps(Recipe.model_json_schema(), indent=2))
        return 0
    if args.command == "list":
        try:
            print(listing(args.kind))
        except ValueError as err:  # an unknown kind: one line listing the kinds
            print(f"urlvr: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "rewards":
        if args.name is not None:
            if args.name not in REWARDS.names():
                elsewhere = registered_elsewhere(args.name, "reward")  # restrain: an advantage shaper
                message = f"{args.name!r} is not a reward: {elsewhere}" if elsewhere else REWARDS.unknown_name_message(args.name)
                print(f"urlvr: error: {message}", file=sys.stderr)
                return 2
            print(describe_reward(REWARDS.get(args.name)))
            return 0
        for name in REWARDS.names():
            spec = REWARDS.get(name)
            print(f"{name:24s} {'[oracle] ' if spec.needs_label else ''}{spec.description}")
        return 0
    if args.command == "plot":
        out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "plots"
        for figure in plot_runs([Path(d) for d in args.run_dirs], out):
            print(f"{figure.path}  ({len(figure.panels)} panels: {', '.join(figure.panels)})")
        return 0
    if args.command == "sweep":
        sweep = load_sweep(args.spec, grid=args.grid, overrides=args.overrides, recipe=args.recipe, out_dir=args.out)
        if args.print_only:
            validate_points(sweep)
            print("\n".join(launch_lines(sweep, launcher=args.launcher)))
        else:
            run_sweep(sweep)
        return 0
    if args.command == "probe":
        base = read_recipe_source(args.recipe)[1] if args.recipe else {}
        results = run_probe(args.models, base, Path(args.out), rewards=args.rewards or None, num_prompts=args.prompts,
                            group_size=args.group_size, overrides=args.overrides, origin=args.recipe,
                            overwrite=args.overwrite)
        print_table(results, rank=args.rank)
        print(f"urlvr: wrote {Path(args.out) / 'probe.json'}, probe.csv and one PNG per model")
        return 0
    if args.command == "mcs":
        base = read_recipe_source(args.recipe)[1] if args.recipe else {}
        results = run_mcs(args.models, base, Path(args.out), max_steps=args.steps, overrides=args.overrides,
                          labels=False if args.label_free else None, overwrite=args.overwrite)
        print(format_table(results))
        print(f"urlvr: wrote {Path(args.out) / 'mcs.csv'} and {Path(args.out) / 'mcs.json'}")
        return 0
    if args.command == "serve":
        _quiet_libraries()
        run_server(args.recipe, host=args.host, port=args.port, key=os.environ.get(KEY_VARIABLE),
                   overrides=args.overrides, threads=args.threads, exit_with_clients=args.exit_with_clients,
                   parent_pid=args.parent_pid)
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
        print(f"# {args.recipe}: valid", file=sys.stderr)
        return 0
    result = train(recipe, resume=args.resume)
    print(f"urlvr: run finished: {result.run_dir}")
    return 0


def run() -> None:
    """The `urlvr` command (and `python -m urlvr.cli`): `main`, then, after a success, the end of
    any process group it started, before the interpreter's (`urlvr.dist.close_distributed`).
    Not inside `main`, which scripts and tests call more than once in one process: DeepSpeed
    keeps the groups of the first, and a second start after a teardown fails on them."""
    code = main()
    if code == 0:
        close_distributed()
    sys.exit(code)


if __name__ == "__main__":
    run()
