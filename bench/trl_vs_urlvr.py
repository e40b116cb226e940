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
# Workloads (--preset); every knob can still be overridden on the command line.
PRESETS: dict[str, dict] = {
    # the embedded tiny model, nearly every response at the cap: the original comparison
    "tiny": dict(model="urlvr/tiny", prompts_per_step=8, group_size=4, max_new_tokens=32, micro_batch_size=8,
                 warmup_steps=2, timed_steps=5, measure_floor=False,
                 targets={"step_time": 0.5, "peak_rss": 1.0}),
    # compute-bound: ~25M-parameter random Llama, 32k vocabulary, lengths spread over the cap
    # (eos hazard 1.5/cap: mean about half the cap, ~20% cut at it; bench/random_model.py)
    "compute": dict(model="random:compute", prompts_per_step=8, group_size=4, max_new_tokens=64, micro_batch_size=8,
                    warmup_steps=1, timed_steps=3, measure_floor=True,
                    targets={"step_time": 0.8, "floor": 1.15}),
    # memory at long responses: 2 prompts x 4 samples x 2048 tokens, 32k vocabulary, eos never sampled
    "memory": dict(model="random:memory", prompts_per_step=2, group_size=4, max_new_tokens=2048, micro_batch_size=4,
                   warmup_steps=0, timed_steps=1, measure_floor=False,
                   targets={"peak_rss": 0.6}),
    # a real pretrained model: SmolLM2-135M-Instruct (30 Llama blocks, 49,152-token tied head),
    # from urlvr's cached float32 folder on both sides; a few prompts and tokens: a CPU step is seconds
    "smollm2": dict(model="urlvr/smollm2-135m-instruct", prompts_per_step=4, group_size=4, max_new_tokens=24,
                    micro_batch_size=8, warmup_steps=1, timed_steps=3, measure_floor=False,
                    targets={"step_time": 0.8, "peak_rss": 0.8}),
}


# --------------------------------------------------------------------------- parent
def resolve_model(spec: str, max_new_tokens: int) -> str:
    """``urlvr/tiny`` -> the embedded tiny model (built into the cache if no asset is committed);
    ``random`` -> a random-init model of the same architecture and tokenizer; ``random:compute``
    / ``random:memory`` -> bench/random_model.py's presets (eos rate set from ``max_new_tokens``); else a path."""
    if spec.startswith("random:"):
        from random_model import preset_settings, save_random_model

        preset = spec.split(":", 1)[1]
        eos_rate = -1.0 if preset == "memory" else 1.5 / max_new_tokens
        return str(save_random_model(RESULTS_DIR / f"random-{preset}", preset_settings(preset, eos_rate=eos_rate)))
    if spec.startswith("urlvr/") and spec not in ("urlvr/tiny", "urlvr/tiny-aligned"):
        # a real model (urlvr/smollm2-135m-instruct, urlvr/gemma3-270m): its cached HF folder,
        # dequantised on first use; both sides load that folder
        from urlvr.models.resolve import resolve_model_path

        return resolve_model_path(spec)
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
        launched = time.time()
        child = subprocess.Popen([python, str(SIDES_SCRIPT), side, json.dumps(settings), result.name], env=env)
        others = sample_other_cpu(child)
        if child.wait():
            raise SystemExit(f"the {side} child failed with exit code {child.returncode}")
        raw = json.loads(Path(result.name).read_text())
    raw["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    # start-up: from the command (process launch) to the first step's start
    raw["startup_s"] = raw["first_step_epoch"] - launched if raw.get("first_step_epoch") else None
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
    padding = [run["training_forwards"]["padding_fraction"] for run in runs if run["training_forwards"]["padding_fraction"] is not None]
    floor = floor_cpu = None
    if all(run.get("floor_forward_backward_s") for run in runs):
        # floor of a timed step = its rollout (time/rollout) + one unpadded forward/backward of its sequences;
        # in CPU time: the rollout's share of the step's CPU time is taken as its share of wall time
        floor, floor_cpu, step_cpu = [], [], []
        for run in runs:
            fwd_bwd = run["floor_forward_backward_s"]
            n = len(fwd_bwd["wall"])
            rollouts, walls = run["stages"]["time/rollout"][-n:], run["step_times"][-n:]
            cpus = run["step_cpu_times"][-n:] if run["step_cpu_times"] else [None] * n
            for rollout, wall, cpu, fb_wall, fb_cpu in zip(rollouts, walls, cpus, fwd_bwd["wall"], fwd_bwd["cpu"]):
                floor.append(rollout + fb_wall)
                if cpu is not None:
                    floor_cpu.append(cpu * rollout / wall + fb_cpu)
                    step_cpu.append(cpu)
    startups = [run["startup_s"] for run in runs if run.get("startup_s") is not None]
    return {"median_step_s": statistics.median(timed), "mean_step_s": statistics.fmean(timed),
            "min_step_s": min(timed), "max_step_s": max(timed), "median_step_cpu_s": statistics.median(timed_cpu) if timed_cpu else None,
            "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
            "tokens_per_step": statistics.fmean(n for run in runs for n in run["tokens_per_step"][warmup:]),
            # whole child process minus its steps: imports, model load, trainer setup, teardown
            "overhead_s": statistics.fmean(run["process_seconds"] - sum(run["step_times"]) for run in runs),
            "other_processes_cpu_cores": statistics.fmean(others) if others else None,
            "update_padding_fraction": statistics.fmean(padding) if padding else None,
            "median_floor_s": statistics.median(floor) if floor else None,
            "step_over_floor": statistics.median(timed) / statistics.median(floor) if floor else None,
            "median_floor_cpu_s": statistics.median(floor_cpu) if floor_cpu else None,
            "step_over_floor_cpu": statistics.median(step_cpu) / statistics.median(floor_cpu) if floor_cpu else None,
            "startup_s": statistics.median(startups) if startups else None,
            "startup_s_all": startups}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "platform": platform.platform(), "python": platform.python_version(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def table(results: dict[str, dict]) -> str:
    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [f"{'side':<12} {'median step s':>14} {'mean step s':>12} {'median CPU s':>13} {'peak RSS MiB':>13}"
             f" {'tokens/step':>12} {'padding':>8} {'start-up s':>11} {'step/floor':>11} {'busy cores elsewhere':>21}"]
    for side, r in results.items():
        lines.append(f"{side:<12} {r['median_step_s']:>14.3f} {r['mean_step_s']:>12.3f} {fmt(r['median_step_cpu_s'], '.3f'):>13}"
                     f" {r['peak_rss_mib']:>13.0f} {r['tokens_per_step']:>12.0f} {fmt(r['update_padding_fraction'], '.1%'):>8}"
                     f" {fmt(r['startup_s'], '.1f'):>11} {fmt(r['step_over_floor'], '.2f'):>11}"
                     f" {fmt(r['other_processes_cpu_cores'], '.2f'):>21}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="workload: tiny (default), compute (25M params, 32k vocab, mixed lengths), memory (2x4x2048 tokens), "
                             "smollm2 (SmolLM2-135M-Instruct, 4x4x24 tokens)")
    parser.add_argument("--model", help="urlvr/tiny, urlvr/smollm2-135m-instruct, urlvr/gemma3-270m, random, random:compute, random:memory, "
                             "or a model directory")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--group-size", type=int, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward, both sides")
    parser.add_argument("--warmup-steps", type=int, help="steps run but not timed")
    parser.add_argument("--timed-steps", type=int)
    parser.add_argument("--no-token-budget", action="store_true",
                        help="do not set trainer.max_tokens_per_micro_batch even where urlvr's recipe has it")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each child (and OMP_NUM_THREADS); see bench/README.md on why 1")
    parser.add_argument("--repeats", type=int, default=1, help="run each side this many times, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default activation checkpointing (off by default, like urlvr)")
    parser.add_argument("--sides", nargs="+", choices=(*SIDES, "urlvr-packed"), default=list(SIDES),
                        help="urlvr-packed: urlvr with trainer.padding_free (each micro-batch's sequences in one "
                             "row, no padding), compared with urlvr when both run")
    parser.add_argument("--urlvr-python", default=sys.executable, help="interpreter for the urlvr child")
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter for the TRL child (needs trl)")
    parser.add_argument("--out", type=Path, help="default: bench/results/trl_vs_urlvr[_<preset>].json")
    parser.add_argument("--profile", action="store_true",
                        help="pyinstrument-profile the timed steps of each side into bench/results/profile_<side>.txt "
                             "(slows them: do not quote a profiled run's timings)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, value)
    args.measure_floor, args.targets = preset["measure_floor"], preset["targets"]
    if args.out is None:
        args.out = RESULTS_DIR / ("trl_vs_urlvr.json" if args.preset == "tiny" else f"trl_vs_urlvr_{args.preset}.json")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total_steps = args.warmup_steps + args.timed_steps
    settings = {
        "preset": args.preset, "model": resolve_model(args.model, args.max_new_tokens), "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
        "micro_batch_size": args.micro_batch_size, "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps, "lr": args.lr, "temperature": args.temperature,
        "threads": args.threads, "seed": args.seed, "data_seed": args.data_seed,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        "measure_floor": args.measure_floor, "token_budget": not args.no_token_budget,
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
            python = args.urlvr_python if side.startswith("urlvr") else args.trl_python
            print(f"[bench] repeat {repeat + 1}/{args.repeats}: {side} ({python}) ...", flush=True)
            runs[side].append(run_child(python, side, settings, env))
    results = {side: summarize(side_runs, args.warmup_steps) for side, side_runs in runs.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**settings, "repeats": args.repeats}, "machine": machine(),
        "summary": results, "raw": runs, "bench_seconds": time.perf_counter() - started,
    }
    print("\n" + table(results))
    for side, side_runs in runs.items():
        if side.startswith("urlvr"):
            found = side_runs[-1].get("versions", {})
            print(f"{side} ran urlvr from {found.get('urlvr_source')} at commit {found.get('urlvr_commit')}")
    if set(SIDES) <= set(results):
        urlvr, trl = results["urlvr"], results["trl"]
        ratios = {
            "median_step_time": urlvr["median_step_s"] / trl["median_step_s"],
            "mean_step_time": urlvr["mean_step_s"] / trl["mean_step_s"],
            "median_step_cpu_time": (urlvr["median_step_cpu_s"] / trl["median_step_cpu_s"]
                                     if urlvr["median_step_cpu_s"] and trl["median_step_cpu_s"] else None),
            "peak_rss": urlvr["peak_rss_mib"] / trl["peak_rss_mib"],
            "startup": urlvr["startup_s"] / trl["startup_s"] if urlvr["startup_s"] and trl["startup_s"] else None,
        }
        report["ratios_urlvr_over_trl"] = ratios
        measured = {"step_time": ratios["median_step_time"], "peak_rss": ratios["peak_rss"], "floor": urlvr["step_over_floor"]}
        report["targets"] = {name: {"max": limit, "measured": measured[name],
                                    "met": measured[name] is not None and measured[name] <= limit}
                             for name, limit in args.targets.items()}
        print("\nurlvr/TRL  median step time {:.2f}x (CPU time {})  peak RSS {:.2f}x  start-up {}".format(
            ratios["median_step_time"], "n/a" if ratios["median_step_cpu_time"] is None else f"{ratios['median_step_cpu_time']:.2f}x",
            ratios["peak_rss"], "n/a" if ratios["startup"] is None else f"{ratios['startup']:.2f}x"))
        if urlvr["step_over_floor_cpu"] is not None:
            print(f"urlvr step / its floor: {urlvr['step_over_floor']:.2f}x wall, {urlvr['step_over_floor_cpu']:.2f}x CPU time")
        for name, target in report["targets"].items():
            print(f"target {name} <= {target['max']}x: {target['measured'] if target['measured'] is None else round(target['measured'], 2)}x "
                  f"({'met' if target['met'] else 'NOT met'})")
    if {"urlvr", "urlvr-packed"} <= set(results):
        packed, padded = results["urlvr-packed"], results["urlvr"]
        report["ratios_packed_over_urlvr"] = {
            "median_step_time": packed["median_step_s"] / padded["median_step_s"],
            "median_step_cpu_time": (packed["median_step_cpu_s"] / padded["median_step_cpu_s"]
                                     if packed["median_step_cpu_s"] and padded["median_step_cpu_s"] else None),
            "peak_rss": packed["peak_rss_mib"] / padded["peak_rss_mib"]}
        print("urlvr-packed/urlvr  median step time {median_step_time:.2f}x  peak RSS {peak_rss:.2f}x".format(
            **report["ratios_packed_over_urlvr"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}  ({report['bench_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
