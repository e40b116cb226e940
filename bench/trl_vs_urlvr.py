"""urlvr vs TRL's GRPOTrainer: the same tiny model and GRPO workload, side by side, on CPU.

    .venv-bench/bin/python bench/trl_vs_urlvr.py                 # defaults: 8 prompts x 4 samples x 32 tokens
    .venv-bench/bin/python bench/trl_vs_urlvr.py --repeats 3 --out /tmp/bench.json

Each side runs in a child process of its own (``bench/grpo_sides.py``, which also says what one
step is on each side) so that peak RSS (``ru_maxrss`` over the child's whole life: imports,
model load, training) never mixes; both children get the same torch thread count and run one
after the other (alternating with ``--repeats``). This file prints the table and writes the JSON.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SIDES_SCRIPT = BENCH_DIR / "grpo_sides.py"
SIDES = ("urlvr", "trl")
STEP_TIME_TARGET = 0.5  # urlvr step time should be <= 0.5x TRL's
RSS_TARGET = 1.0  # urlvr peak RSS should be <= TRL's


# --------------------------------------------------------------------------- parent
def resolve_model(spec: str) -> str:
    """``urlvr/tiny`` -> the embedded tiny model (built into the cache if no asset is committed);
    ``random`` -> a random-init model of the same architecture and tokenizer; else a path."""
    if spec == "urlvr/tiny":
        from urlvr.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    if spec == "random":
        from urlvr.models.tiny import TinyModelSettings, build_model, build_tokenizer, wrap_tokenizer

        out = RESULTS_DIR / "random-tiny"
        if not (out / "config.json").is_file():
            tokenizer = build_tokenizer()
            build_model(TinyModelSettings(), tokenizer, seed=0).save_pretrained(out)
            wrap_tokenizer(tokenizer).save_pretrained(out)
        return str(out)
    return str(Path(spec).resolve())


def run_child(python: str, side: str, settings: dict, env: dict[str, str]) -> dict:
    """One side in a fresh process; adds how busy the rest of the machine was meanwhile."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=RESULTS_DIR) as result:
        load_before = os.getloadavg()
        child = subprocess.Popen([python, str(SIDES_SCRIPT), side, json.dumps(settings), result.name], env=env)
        others = sample_other_cpu(child)
        if child.wait():
            raise SystemExit(f"the {side} child failed with exit code {child.returncode}")
        raw = json.loads(Path(result.name).read_text())
    raw["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    # CPU used by processes outside the bench while the child ran, in cores (None without psutil).
    # On a shared 2-core box this is what makes timings noisy: read the numbers with it.
    raw["other_processes_cpu_cores_mean"] = statistics.fmean(others) if others else None
    return raw


def sample_other_cpu(child: subprocess.Popen, interval: float = 0.5) -> list[float]:
    """Until ``child`` exits: cores' worth of CPU used by everything but the child's process tree."""
    try:
        import psutil
    except ImportError:
        child.wait()
        return []
    tree = psutil.Process(child.pid)
    psutil.cpu_percent()
    mine = {tree.pid: tree.cpu_times()}
    samples = []
    while child.poll() is None:
        time.sleep(interval)
        total = psutil.cpu_percent() / 100 * psutil.cpu_count()
        used = 0.0
        try:
            for proc in [tree, *tree.children(recursive=True)]:
                now = proc.cpu_times()
                before = mine.get(proc.pid, now)
                used += (now.user + now.system - before.user - before.system) / interval
                mine[proc.pid] = now
        except psutil.NoSuchProcess:
            continue
        samples.append(max(0.0, total - used))
    return samples


def summarize(runs: list[dict], warmup: int) -> dict:
    """Timed steps pooled over repeats; peak RSS is the largest over repeats."""
    timed = [t for run in runs for t in run["step_times"][warmup:]]
    have_cpu = all(run["step_cpu_times"] for run in runs)
    timed_cpu = [t for run in runs for t in run["step_cpu_times"][warmup:]] if have_cpu else []
    others = [run["other_processes_cpu_cores_mean"] for run in runs if run["other_processes_cpu_cores_mean"] is not None]
    return {"median_step_s": statistics.median(timed), "mean_step_s": statistics.fmean(timed),
            "min_step_s": min(timed), "max_step_s": max(timed), "median_step_cpu_s": statistics.median(timed_cpu) if timed_cpu else None,
            "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
            "tokens_per_step": statistics.fmean(n for run in runs for n in run["tokens_per_step"][warmup:]),
            # whole child process minus its steps: imports, model load, trainer setup, teardown
            "overhead_s": statistics.fmean(run["process_seconds"] - sum(run["step_times"]) for run in runs),
            "other_processes_cpu_cores": statistics.fmean(others) if others else None}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "platform": platform.platform(), "python": platform.python_version(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def table(results: dict[str, dict]) -> str:
    lines = [f"{'side':<6} {'median step s':>14} {'mean step s':>12} {'median CPU s':>13} {'peak RSS MiB':>13}"
             f" {'tokens/step':>12} {'overhead s':>11} {'busy cores elsewhere':>21}"]
    for side, r in results.items():
        others = "n/a" if r["other_processes_cpu_cores"] is None else f"{r['other_processes_cpu_cores']:.2f}"
        cpu = "n/a" if r["median_step_cpu_s"] is None else f"{r['median_step_cpu_s']:.3f}"
        lines.append(f"{side:<6} {r['median_step_s']:>14.3f} {r['mean_step_s']:>12.3f} {cpu:>13}"
                     f" {r['peak_rss_mib']:>13.0f} {r['tokens_per_step']:>12.0f} {r['overhead_s']:>11.1f} {others:>21}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="urlvr/tiny", help="urlvr/tiny (default), random, or a model directory")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward, both sides")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps run but not timed")
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each child (and OMP_NUM_THREADS); see bench/README.md on why 1")
    parser.add_argument("--repeats", type=int, default=1, help="run each side this many times, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default activation checkpointing (off by default, like urlvr)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--urlvr-python", default=sys.executable, help="interpreter for the urlvr child")
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter for the TRL child (needs trl)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "trl_vs_urlvr.json")
    parser.add_argument("--profile", action="store_true",
                        help="pyinstrument-profile the timed steps of each side into bench/results/profile_<side>.txt "
                             "(slows them: do not quote a profiled run's timings)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total_steps = args.warmup_steps + args.timed_steps
    settings = {
        "model": resolve_model(args.model), "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
        "micro_batch_size": args.micro_batch_size, "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps, "lr": args.lr, "temperature": args.temperature,
        "threads": args.threads, "seed": args.seed, "data_seed": args.data_seed,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        **{f"profile_{side}": str(RESULTS_DIR / f"profile_{side}.txt") if args.profile else None for side in SIDES},
        # one pass over exactly the prompts the steps need: both sides see the same prompts in order
        "num_prompts": total_steps * args.prompts_per_step,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           # DeepSpeed JIT-builds a C++ op (shm comm) at init on CPU; a private build dir keeps this
           # venv's build from invalidating (and waiting on) another venv's copy in ~/.cache
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(RESULTS_DIR / "torch_extensions"))}
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):  # sides alternate, so slow phases of a shared box hit both
        for side in args.sides:
            python = args.urlvr_python if side == "urlvr" else args.trl_python
            print(f"[bench] repeat {repeat + 1}/{args.repeats}: {side} ({python}) ...", flush=True)
            runs[side].append(run_child(python, side, settings, env))
    results = {side: summarize(side_runs, args.warmup_steps) for side, side_runs in runs.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**settings, "repeats": args.repeats}, "machine": machine(),
        "summary": results, "raw": runs, "bench_seconds": time.perf_counter() - started,
    }
    print("\n" + table(results))
    if set(results) == set(SIDES):
        step_ratio = results["urlvr"]["median_step_s"] / results["trl"]["median_step_s"]
        rss_ratio = results["urlvr"]["peak_rss_mib"] / results["trl"]["peak_rss_mib"]
        report["ratios_urlvr_over_trl"] = {
            "median_step_time": step_ratio, "mean_step_time": results["urlvr"]["mean_step_s"] / results["trl"]["mean_step_s"],
            "median_step_cpu_time": (results["urlvr"]["median_step_cpu_s"] / results["trl"]["median_step_cpu_s"]
                                     if results["urlvr"]["median_step_cpu_s"] and results["trl"]["median_step_cpu_s"] else None),
            "peak_rss": rss_ratio,
        }
        report["targets"] = {"step_time_ratio_max": STEP_TIME_TARGET, "step_time_met": step_ratio <= STEP_TIME_TARGET,
                             "peak_rss_ratio_max": RSS_TARGET, "peak_rss_met": rss_ratio <= RSS_TARGET}
        print(f"\nurlvr/TRL  median step time {step_ratio:.2f}x (target <= {STEP_TIME_TARGET}x: "
              f"{'met' if step_ratio <= STEP_TIME_TARGET else 'NOT met'})  "
              f"peak RSS {rss_ratio:.2f}x (target <= {RSS_TARGET}x: {'met' if rss_ratio <= RSS_TARGET else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}  ({report['bench_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
