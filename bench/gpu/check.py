"""One-call GPU check: the CUDA test subset, then urlvr vs TRL step time on Qwen3-0.6B's architecture.

    python bench/gpu/check.py                 # on the GPU machine: JSON under $OUT (see bench/gpu/README.md)
    python bench/gpu/check.py --dry-run       # on CPU, in seconds: the same code paths at toy sizes (CI)

1. ``pytest tests/test_gpu.py`` (bf16 training under ZeRO-0/2/3 in one process, the transformers
   engine on CUDA); ``--dry-run`` only collects it, so a renamed fixture or import fails on CPU.
2. A random-init model with Qwen3-0.6B's architecture (bench/random_model.py, eos pushed to
   -30: every response runs to the cap, "EOS ignored"), bf16, 64 prompts x 8 samples x 1024
   tokens, one side at a time in its own process (bench/grpo_sides.py): step time, urlvr's stage
   breakdown, tokens/s, the update's model-FLOPs utilisation and peak GPU memory.
Everything lands in ``OUT/gpu_check.json`` (and the pytest log/junit beside it); a side that
fails is recorded with its error and the other still runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from random_model import parameter_count, preset_settings, save_random_model  # noqa: E402
from trl_vs_urlvr import RESULTS_DIR, machine, run_child  # noqa: E402

H200_BF16_DENSE_FLOPS = 989.5e12  # vendor datasheet (SXM); docs: /work/.library/device/H200.md


def run_tests(out: Path, dry_run: bool, timeout: int) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
               f"--junitxml={out / 'gpu_tests.xml'}"] + (["--collect-only"] if dry_run else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, log = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        rc, log = 124, f"timed out after {timeout} s\n{error.stdout or ''}"
    (out / "gpu_tests.log").write_text(log)
    return {"command": " ".join(command), "returncode": rc, "seconds": time.perf_counter() - started,
            "collect_only": dry_run, "tail": log.splitlines()[-15:]}


def side_summary(raw: dict, settings: dict, n_params: int, layers: int, attention_width: int) -> dict:
    """Medians over the timed steps; the update's MFU from model FLOPs per trained token:
    6 N (weights, forward + backward) + 6 L d_attn s/2 (causal attention at mean context s/2)."""
    import statistics

    warmup = settings["warmup_steps"]
    steps = raw["step_times"][warmup:]
    tokens = raw["tokens_per_step"][warmup:]
    total_steps = len(raw["step_times"])
    trained = raw["training_forwards"]["real_tokens"] / total_steps  # prompt + response tokens per step
    context = trained / (settings["prompts_per_step"] * settings["group_size"])
    flops_per_token = 6 * n_params + 6 * layers * attention_width * context / 2
    summary = {"median_step_s": statistics.median(steps), "step_times": raw["step_times"],
               "response_tokens_per_step": statistics.fmean(tokens),
               "response_tokens_per_s": statistics.fmean(tokens) / statistics.median(steps),
               "trained_tokens_per_step": trained, "update_padding_fraction": raw["training_forwards"]["padding_fraction"],
               "peak_gpu_memory_gib": raw.get("peak_gpu_memory_gib"), "peak_rss_mib": raw["peak_rss_mib"],
               "startup_s": raw.get("startup_s"), "versions": raw["versions"]}
    if "stages" in raw:  # urlvr: stage breakdown, and the update's own time for its MFU
        summary["stages_median_s"] = {k: statistics.median(v[warmup:]) for k, v in raw["stages"].items()}
        update = summary["stages_median_s"].get("time/update")
        if update:
            summary["update_mfu"] = flops_per_token * trained / update / H200_BF16_DENSE_FLOPS
    # whole-step model-FLOPs rate of the update's work (both sides; generation not counted)
    summary["step_update_flops_per_s"] = flops_per_token * trained / summary["median_step_s"]
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, tests only collected")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS_DIR / "gpu")))
    parser.add_argument("--sides", nargs="+", choices=("urlvr", "trl"), default=["urlvr", "trl"])
    parser.add_argument("--prompts", type=int, help="prompts per step (default 64; dry run 2)")
    parser.add_argument("--group-size", type=int, help="default 8; dry run 2")
    parser.add_argument("--max-new-tokens", type=int, help="default 1024; dry run 8")
    parser.add_argument("--micro-batch-size", type=int, help="default 16; dry run 2")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default 1; dry run 0")
    parser.add_argument("--timed-steps", type=int, default=1)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests-timeout", type=int, default=150)
    args = parser.parse_args(argv)
    full = {"prompts": 64, "group_size": 8, "max_new_tokens": 1024, "micro_batch_size": 16, "warmup_steps": 1}
    dry = {"prompts": 2, "group_size": 2, "max_new_tokens": 8, "micro_batch_size": 2, "warmup_steps": 0}
    for key, value in (dry if args.dry_run else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "dry_run": args.dry_run, "machine": machine()}
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    report["cuda"] = {"available": torch.cuda.is_available(), "device": torch.cuda.get_device_name() if cuda else None,
                      "torch": torch.__version__, "cuda_version": torch.version.cuda}
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    report["tests"] = None if args.skip_tests else run_tests(args.out, args.dry_run, args.tests_timeout)
    print(f"[gpu-check] tests: {report['tests'] and report['tests']['returncode']}", flush=True)

    preset = "qwen3-dry" if args.dry_run else "qwen3-0.6b"
    model_settings = preset_settings(preset, eos_rate=-1.0)
    model_dir = save_random_model(RESULTS_DIR / f"random-{preset}", model_settings)
    n_params = parameter_count(model_settings)
    total_steps = args.warmup_steps + args.timed_steps
    settings = {
        "preset": f"gpu-{preset}", "model": str(model_dir), "prompts_per_step": args.prompts, "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens, "micro_batch_size": args.micro_batch_size,
        "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps, "lr": 1e-6, "temperature": 1.0,
        "threads": 4 if cuda else 1, "seed": 0, "data_seed": 1, "trl_gradient_checkpointing": False,
        "profile_urlvr": None, "profile_trl": None, "num_prompts": total_steps * args.prompts,
        "measure_floor": False, "token_budget": True, "bf16": cuda, "cuda": cuda,
        "generation_batch_size": args.prompts * args.group_size,
    }
    report["settings"] = {**settings, "n_params": n_params}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(settings["threads"])}
    if not cuda:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    sides = [side for side in args.sides if side != "trl" or _importable("trl")]
    report["sides_skipped"] = sorted(set(args.sides) - set(sides))
    report["sides"] = {}
    width = model_settings.num_heads * (model_settings.head_dim or model_settings.hidden_size // model_settings.num_heads)
    for side in sides:
        print(f"[gpu-check] {side} ...", flush=True)
        try:
            raw = run_child(sys.executable, side, settings, env)
            report["sides"][side] = side_summary(raw, settings, n_params, model_settings.num_layers, width)
        except (SystemExit, Exception) as error:  # record it; the other side still runs
            report["sides"][side] = {"error": repr(error)}
    results = report["sides"]
    if all("median_step_s" in results.get(side, {}) for side in ("urlvr", "trl")):
        report["urlvr_over_trl"] = {"median_step_time": results["urlvr"]["median_step_s"] / results["trl"]["median_step_s"]}
    report["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    for side, r in results.items():
        if "error" in r:
            print(f"{side:<6} ERROR {r['error']}")
        else:
            mfu = f"{r['update_mfu']:.1%}" if r.get("update_mfu") is not None else "n/a"
            gpu = "n/a" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.1f}"
            print(f"{side:<6} step {r['median_step_s']:.2f} s  {r['response_tokens_per_s']:.0f} response tok/s  "
                  f"update MFU {mfu}  peak GPU {gpu} GiB  start-up {r['startup_s']:.1f} s")
    print(f"wrote {args.out / 'gpu_check.json'} ({report['seconds']:.0f} s)")
    failed = (report["tests"] is not None and report["tests"]["returncode"] not in (0,)) or any("error" in r for r in results.values())
    return 1 if failed else 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    raise SystemExit(main())
