"""One-call GPU run of bench/async_vs_sync.py: colocated vLLM vs vLLM in a generation server, k = 0 and k = 1.

    python bench/gpu/async_check.py                           # GPU machine with vLLM: JSON under $OUT
    python bench/gpu/async_check.py --backend transformers    # the lent image has no vLLM: HF generate on CUDA
    python bench/gpu/async_check.py --dry-run                 # CPU, seconds: arguments and the 3 recipes, validated

On one GPU the trainer and the server share the device: the server's vLLM takes
``--gpu-memory-utilization`` of it (awake throughout: nothing offloads it), the colocated engine
of ``sync`` the same share (asleep during the update). A random-init model with Qwen3-0.6B's
architecture (bench/random_model.py, eos pushed to -30: every response runs to the cap), bf16,
32 prompts x 8 samples x 512 tokens, 1 warm-up + 3 timed steps, one round: step time of each
configuration, its ratio to ``sync``, and the stage and ``async/*`` medians (bench/async_vs_sync.py
says what each is). Everything lands in ``OUT/async_check.json``.

``--dry-run`` builds the toy Qwen3 (``qwen3-dry``), writes the three configurations' recipes with
the chosen backend and validates each with urlvr's recipe loader, on CPU, without vLLM and
without training: tests/test_bench_gpu.py runs it so that the script cannot rot between loans.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH_DIR))

import async_vs_sync  # noqa: E402
from random_model import preset_settings, save_random_model  # noqa: E402
from trl_vs_urlvr import RESULTS_DIR, machine  # noqa: E402

# the workload of the GPU run; --dry-run keeps the arguments but validates recipes only
WORKLOAD = {"prompts": 32, "group_size": 8, "max_new_tokens": 512, "micro_batch_size": 16, "steps": 3, "warmup": 1,
            "rounds": 1, "threads": 4}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(this script's arguments, the argv handed to bench/async_vs_sync.py); anything not named
    here (--prompts, --max-new-tokens, --rounds, ...) overrides WORKLOAD there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: validate the three recipes, run nothing")
    parser.add_argument("--backend", choices=("vllm", "transformers"), default="vllm")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS_DIR / "gpu")))
    args, rest = parser.parse_known_args(argv)
    bench = [f"--{key.replace('_', '-')}={value}" for key, value in WORKLOAD.items()] + list(rest)
    bench += ["--backend", args.backend, "--out", str(args.out / "async_vs_sync.json")]
    if not args.dry_run:
        bench += ["--cuda", "--bf16"]
    return args, bench


def main(argv: Sequence[str] | None = None) -> int:
    args, bench_argv = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    preset = "qwen3-dry" if args.dry_run else "qwen3-0.6b"
    model_dir = save_random_model(RESULTS_DIR / f"random-{preset}", preset_settings(preset, eos_rate=-1.0))
    bench_argv += ["--model", str(model_dir)]
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "dry_run": args.dry_run, "machine": machine(), "bench_argv": bench_argv}
    bench_args = async_vs_sync.parse_args(bench_argv)  # argparse's one-line error on a bad value
    if args.dry_run:
        from urlvr.recipe import load_recipe

        recipes = {config: async_vs_sync.build_recipe(config, bench_args, args.out / config)
                   for config in bench_args.configs}
        for config, recipe in recipes.items():
            load_recipe(recipe)  # a RecipeError names what the schema refuses
        report["recipes"] = recipes
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on CPU")
        report["cuda"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "cuda_version": torch.version.cuda}
        report["bench"] = async_vs_sync.main(bench_argv)
    report["seconds"] = time.perf_counter() - started
    (args.out / "async_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'async_check.json'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
