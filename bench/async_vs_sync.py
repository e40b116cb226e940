"""Asynchronous generation vs synchronous: the same GRPO workload three ways, side by side, on CPU.

    .venv/bin/python bench/async_vs_sync.py                     # tiny model, 3 configurations x 3 rounds, ~3 min
    .venv/bin/python bench/async_vs_sync.py --rounds 3 --max-new-tokens 64 --out /tmp/async.json
    .venv-vllm/bin/python bench/async_vs_sync.py --backend vllm # vLLM colocated vs vLLM in the server

The configurations (``CONFIGS``), each a whole ``urlvr train`` process of its own:
- ``sync``: the colocated engine (``rollout.engine: transformers``, or ``vllm``): generation,
  then the update, one after the other in the trainer's process;
- ``server-k0``: ``rollout.engine: server`` with ``trainer.max_staleness: 0``: the same algorithm
  (bit-identical, tests/test_async.py) with generation in a server process; the cost of the
  server (pickling groups, the weight broadcast) with no overlap to pay for it;
- ``server-k1``: the server with ``max_staleness: 1``: step t+1's rollout is sampled while step
  t trains. The best it can do is max(gen, train) / (gen + train) of ``sync``'s step.

One thread each (``--threads``): the trainer runs with OMP_NUM_THREADS / MKL_NUM_THREADS, the
server with ``rollout.engine.threads``, so the overlap uses at most two cores, and a
configuration never gets more cores than another. The children get a clean environment (no
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: each is a world of one). The rounds
rotate the order of the configurations so that a noisy phase of a shared machine hits all.

Per configuration, medians over the timed steps of every round (the first ``--warmup`` steps of
each run are left out): ``time/step``, its ratio to ``sync``'s, ``time/rollout``,
``async/rollout_wait_s`` (how long the trainer blocked collecting a rollout),
``time/weight_sync`` (with k = 1 it also holds the wait for a generation still running: the
server takes the weights once it is done), ``time/update``, ``async/server_idle_s``,
``async/staleness_mean``, response tokens per step; and from psutil, the CPU seconds and thread
count of the trainer and server processes and how busy the rest of the machine was. Prints a
Markdown table and writes JSON (``bench/results/async_vs_sync.json``: every step's metrics).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))

from trl_vs_urlvr import machine  # noqa: E402

CONFIGS = ("sync", "server-k0", "server-k1")
TARGET_K1_OVER_SYNC = 0.7  # the issue's target: k = 1 step time <= 0.7x synchronous
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STEP_KEYS = ("step", "time/step", "time/rollout", "time/update", "time/weight_sync", "time/score", "time/reward",
             "time/metrics", "perf/response_tokens", "async/rollout_wait_s", "async/server_idle_s",
             "async/staleness_mean", "async/staleness_max", "async/in_flight")


# --------------------------------------------------------------------------- recipes
def colocated_engine(args: argparse.Namespace) -> dict:
    """The backend's own section: the colocated engine of `sync`, and what the server runs."""
    if args.backend == "vllm":
        return {"name": "vllm", "gpu_memory_utilization": args.gpu_memory_utilization}
    return {"name": "transformers", "generation_batch_size": args.prompts * args.group_size}


def engine_section(config: str, args: argparse.Namespace) -> dict:
    backend = colocated_engine(args)
    if config == "sync":
        return backend
    # the server never sleeps (nothing else trains on its devices): its backend's `sleep` is refused there
    return {"name": "server", "backend": backend, "threads": args.threads,
            "startup_timeout_s": args.timeout, "request_timeout_s": args.timeout}


def build_recipe(config: str, args: argparse.Namespace, output_dir: Path) -> dict:
    """One configuration's recipe: everything but `rollout.engine` and `trainer.max_staleness`
    is the same in all three."""
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")
    steps = args.warmup + args.steps
    trainer = {"total_steps": steps, "prompts_per_step": args.prompts, "prompts_per_minibatch": args.prompts,
               "micro_batch_size": args.micro_batch_size, "save_every": 0, "export_final_model": False,
               "max_staleness": 1 if config == "server-k1" else 0}
    recipe = {
        "seed": args.seed, "output_dir": str(output_dir), "model": {"path": args.model},
        # one pass over exactly the prompts the steps need, in the same order everywhere
        "data": {"source": {"kind": "arithmetic", "num_problems": steps * args.prompts, "seed": args.data_seed},
                 "shuffle": False},
        "rollout": {"engine": engine_section(config, args), "group_size": args.group_size,
                    "max_new_tokens": args.max_new_tokens},
        # majority vote reads no token statistic: no scoring forward, the update is one forward + backward
        "reward": {"terms": [{"name": "majority_vote"}], "extractor": "boxed", "oracle": None},
        "optim": {"lr": args.lr, "deepspeed": {"precision": "bf16" if args.bf16 else "fp32"}},
        "trainer": trainer,
        "logging": {"console": False, "completions_per_step": 0},
    }
    return recipe


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """A clean world of one per child, `--threads` threads, this checkout's urlvr first."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if not args.cuda:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


# --------------------------------------------------------------------------- one run
def run_config(config: str, args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    """`urlvr train` of one configuration in a fresh process; its step rows and process figures."""
    out = work / config
    recipe_path = work / f"{config}.yaml"
    recipe_path.write_text(yaml.safe_dump(build_recipe(config, args, out), sort_keys=False))
    command = [args.python, "-m", "urlvr.cli", "train", str(recipe_path)]
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with open(work / f"{config}.log", "wb") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes = watch(child)
    seconds = time.perf_counter() - started
    if child.returncode:
        tail = (work / f"{config}.log").read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"{config} failed (exit code {child.returncode}):\n  " + "\n  ".join(tail))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {"rows": [{k: row[k] for k in STEP_KEYS if k in row} for row in rows], "process_s": seconds,
            "load_average_before_after": [load_before, os.getloadavg()[0]], **processes}


def watch(child: subprocess.Popen, interval: float = 0.5) -> dict:
    """Until `child` exits: the CPU seconds and the most threads of the trainer and of its
    generation server (any `urlvr ... serve` below it), and the cores' worth of CPU the rest of
    the machine used meanwhile (None for all without psutil)."""
    try:
        import psutil
    except ImportError:
        child.wait()
        return {"trainer": None, "server": None, "other_processes_cpu_cores_mean": None}
    trainer = psutil.Process(child.pid)
    seen: dict[int, dict] = {}
    others: list[float] = []
    psutil.cpu_percent()
    previous: dict[int, float] = {}
    while child.poll() is None:
        time.sleep(interval)
        total = psutil.cpu_percent() / 100 * psutil.cpu_count()
        used = 0.0
        try:
            for process in [trainer, *trainer.children(recursive=True)]:
                with process.oneshot():
                    times, threads = process.cpu_times(), process.num_threads()
                    role = "server" if "serve" in process.cmdline() else "trainer" if process.pid == child.pid else "other"
                cpu = times.user + times.system
                used += (cpu - previous.get(process.pid, cpu)) / interval
                previous[process.pid] = cpu
                entry = seen.setdefault(process.pid, {"role": role, "cpu_s": 0.0, "max_threads": 0})
                entry["cpu_s"], entry["max_threads"] = cpu, max(entry["max_threads"], threads)
        except psutil.Error:  # a process of the tree ended between the listing and the reading
            continue
        others.append(max(0.0, total - used))

    def role(name: str) -> dict | None:
        found = [entry for entry in seen.values() if entry["role"] == name]
        return {"cpu_s": sum(e["cpu_s"] for e in found), "max_threads": max(e["max_threads"] for e in found)} if found else None

    return {"trainer": role("trainer"), "server": role("server"),
            "other_processes_cpu_cores_mean": statistics.fmean(others) if others else None}


# --------------------------------------------------------------------------- summary
def summarize(runs: list[dict], warmup: int) -> dict:
    """Medians over the timed steps of every run of one configuration (None where no step logs a key)."""
    timed = [row for run in runs for row in run["rows"][warmup:]]

    def median(key: str) -> float | None:
        values = [row[key] for row in timed if key in row]
        return statistics.median(values) if values else None

    others = [run["other_processes_cpu_cores_mean"] for run in runs if run["other_processes_cpu_cores_mean"] is not None]
    summary = {"timed_steps": len(timed), **{key: median(key) for key in STEP_KEYS if key != "step"},
               "trainer_cpu_s": [run["trainer"] and run["trainer"]["cpu_s"] for run in runs],
               "server_cpu_s": [run["server"] and run["server"]["cpu_s"] for run in runs],
               "trainer_max_threads": max((run["trainer"] or {}).get("max_threads", 0) for run in runs) or None,
               "server_max_threads": max((run["server"] or {}).get("max_threads", 0) for run in runs) or None,
               "process_s": [run["process_s"] for run in runs],
               "other_processes_cpu_cores": statistics.fmean(others) if others else None}
    # the rest of the step beside generation: what a perfect overlap would hide generation behind
    summary["rest_of_step_s"] = statistics.median(row["time/step"] - row["time/rollout"] for row in timed)
    return summary


def best_case(sync: dict) -> float:
    """max(gen, rest) / (gen + rest) from the synchronous medians: k = 1's step over sync's if
    the overlap were perfect and free."""
    gen, rest = sync["time/rollout"], sync["rest_of_step_s"]
    return max(gen, rest) / (gen + rest)


def table(summary: dict[str, dict]) -> str:
    def cell(value: float | None, spec: str = ".3f") -> str:
        return "n/a" if value is None else format(value, spec)

    sync_step = summary["sync"]["time/step"] if "sync" in summary else None
    lines = ["| configuration | median step (s) | x sync | rollout (s) | rollout wait (s) | update (s) | weight sync (s) "
             "| server idle (s) | staleness mean | tokens/step | busy cores elsewhere |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config, s in summary.items():
        ratio = s["time/step"] / sync_step if sync_step else None
        lines.append(f"| {config} | {cell(s['time/step'])} | {cell(ratio, '.2f')} | {cell(s['time/rollout'])} "
                     f"| {cell(s['async/rollout_wait_s'])} | {cell(s['time/update'])} | {cell(s['time/weight_sync'])} "
                     f"| {cell(s['async/server_idle_s'])} | {cell(s['async/staleness_mean'], '.2f')} "
                     f"| {cell(s['perf/response_tokens'], '.0f')} | {cell(s['other_processes_cpu_cores'], '.2f')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                        help="the engine of `sync` and the server's backend (vllm: needs vLLM installed)")
    parser.add_argument("--model", default="urlvr/tiny", help="urlvr/tiny (embedded, no download) or a model folder")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the medians")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration, the order rotated each round")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the server, each")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vllm backend: its device share")
    parser.add_argument("--bf16", action="store_true", help="bf16 training and sampling (GPU)")
    parser.add_argument("--cuda", action="store_true", help="leave CUDA visible to the children (GPU machines)")
    parser.add_argument("--timeout", type=float, default=900.0, help="the server's startup and request timeouts (s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the children (needs urlvr)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "async_vs_sync.json")
    args = parser.parse_args(argv)
    for name in ("prompts", "group_size", "max_new_tokens", "micro_batch_size", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if (args.prompts * args.group_size) % args.micro_batch_size:
        parser.error(f"--micro-batch-size {args.micro_batch_size} must divide prompts x group size "
                     f"({args.prompts * args.group_size})")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("--backend vllm: vLLM is not installed in this interpreter (the .venv-vllm of "
                             "docs/vllm.md has it); or run --backend transformers")
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    env = child_env(args)
    runs: dict[str, list[dict]] = {config: [] for config in args.configs}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="async-", dir=RESULTS_DIR) as tmp:
        for round_index in range(args.rounds):
            order = args.configs[round_index % len(args.configs):] + args.configs[:round_index % len(args.configs)]
            for config in order:
                print(f"[bench] round {round_index + 1}/{args.rounds}: {config} ...", flush=True)
                work = Path(tmp) / f"round-{round_index}"
                work.mkdir(exist_ok=True)
                runs[config].append({"round": round_index, **run_config(config, args, work, env)})
    summary = {config: summarize(config_runs, args.warmup) for config, config_runs in runs.items()}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "recipe_sync": build_recipe("sync", args, Path("RUN")), "machine": machine(),
              "load_average_1min_start_end": [load_at_start, os.getloadavg()[0]], "summary": summary, "runs": runs}
    print(f"\n{args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} new tokens per step, "
          f"{args.model}, backend {args.backend}, {args.threads} thread(s) per process; medians over "
          f"{args.steps} timed steps x {args.rounds} round(s)\n")
    print(table(summary))
    if "sync" in summary:
        ideal = best_case(summary["sync"])
        report["best_case_k1_over_sync"] = ideal
        print(f"\nbest case for k = 1 (max(gen, rest) / (gen + rest) of sync's medians): {ideal:.2f}x")
        if "server-k1" in summary:
            measured = summary["server-k1"]["time/step"] / summary["sync"]["time/step"]
            report["target"] = {"k1_over_sync_max": TARGET_K1_OVER_SYNC, "measured": measured,
                                "met": measured <= TARGET_K1_OVER_SYNC}
            print(f"target k = 1 step <= {TARGET_K1_OVER_SYNC}x sync: {measured:.2f}x "
                  f"({'met' if measured <= TARGET_K1_OVER_SYNC else 'NOT met'})")
    print("\nper run (round: median step s, busy cores elsewhere):")
    for config, config_runs in runs.items():
        print(f"  {config:<10} " + "  ".join(
            f"{run['round'] + 1}: {statistics.median(r['time/step'] for r in run['rows'][args.warmup:]):.3f} s, "
            f"{'n/a' if run['other_processes_cpu_cores_mean'] is None else format(run['other_processes_cpu_cores_mean'], '.2f')}"
            for run in config_runs))
    for config, s in summary.items():
        print(f"{config}: trainer CPU s per run {[round(c, 1) for c in s['trainer_cpu_s'] if c is not None]} "
              f"(threads <= {s['trainer_max_threads']}), server CPU s {[round(c, 1) for c in s['server_cpu_s'] if c is not None]} "
              f"(threads <= {s['server_max_threads']}), process s {[round(p, 1) for p in s['process_s']]}")
    report["bench_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['bench_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
