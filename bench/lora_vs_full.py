"""LoRA (`model.lora`) vs full fine-tuning: step time and peak memory of the same urlvr run, on CPU.

    .venv/bin/python bench/lora_vs_full.py                          # defaults below, a few minutes on 2 vCPUs
    .venv/bin/python bench/lora_vs_full.py --hidden 768 --layers 12 --steps 4 --out /tmp/lora.json

Both sides in one invocation, each in a fresh child process (so `ru_maxrss` is that side's own
peak): `urlvr.train` on a random-init Llama built from the embedded tiny model's config and
tokenizer, made large enough that the step is compute-bound (default hidden 512, 8 layers, MLP
1536: 27M parameters) -- the tiny model itself (0.4M) is dominated by per-op overhead, where
LoRA can save nothing. Same prompts, seeds, rollout and reward (self-certainty: it varies in
every group, so every step has a real gradient) on both sides; the LoRA side adapts every linear
layer of the decoder (`target_modules: all-linear`). The first `--warmup` steps are not timed.

Columns: median `time/step` and `time/update` (from metrics.jsonl) over the timed steps; peak RSS
of the child (imports, model, DeepSpeed engine, optimizer state, training); trainable parameters;
size of the step's checkpoint. Prints a table and writes JSON (`bench/results/lora_vs_full.json`).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SIDES = ("full", "lora")


def build_model(directory: Path, hidden: int, layers: int, intermediate: int) -> Path:
    """A random-init Llama with the embedded tiny model's tokenizer and vocabulary, saved."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from urlvr.models.tiny import resolve_model_path

    tiny = resolve_model_path("urlvr/tiny")
    config = AutoConfig.from_pretrained(tiny)
    heads = max(1, hidden // 64)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
                   "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": 64,
                   "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(directory)
    return directory


def child(side: str, model_dir: str, out_dir: str, steps: int, threads: int, rank: int) -> dict:
    import torch

    import urlvr

    torch.set_num_threads(threads)
    model = {"path": model_dir}
    if side == "lora":
        model["lora"] = {"rank": rank, "alpha": 2 * rank, "target_modules": "all-linear"}
    recipe = {
        "seed": 0, "output_dir": out_dir, "model": model,
        "data": {"source": {"kind": "arithmetic", "num_problems": 64, "seed": 1}},
        "rollout": {"group_size": 4, "max_new_tokens": 32},
        "reward": {"terms": [{"name": "self_certainty"}]},
        "trainer": {"total_steps": steps, "prompts_per_step": 8, "prompts_per_minibatch": 8, "micro_batch_size": 8,
                    "save_every": steps, "export_final_model": False},
        "optim": {"lr": 1e-4 if side == "lora" else 1e-6},
        "logging": {"console": False},
    }
    result = urlvr.train(recipe)
    checkpoint = next((Path(out_dir) / "checkpoints").iterdir())
    return {
        "metrics": [{k: m[k] for k in ("step", "time/step", "time/update", "time/rollout", "time/score",
                                       "perf/response_tokens")} for m in result.metrics],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checkpoint_mb": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 2**20,
    }


def count_parameters(model_dir: Path, rank: int) -> dict[str, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    return {"full": total, "lora": sum(p.numel() for p in lora.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--steps", type=int, default=4, help="steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "lora_vs_full.json")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, model_dir, out_dir, steps, threads, rank = args.child
        print(json.dumps(child(side, model_dir, out_dir, int(steps), int(threads), int(rank))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.hidden, args.layers, args.intermediate)
        parameters = count_parameters(model_dir, args.rank)
        sides = {}
        for side in SIDES:
            command = [sys.executable, __file__, "--child", side, str(model_dir), str(Path(tmp) / side),
                       str(args.steps), str(args.threads), str(args.rank)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{side} side failed:\n{out.stderr[-3000:]}")
            sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {}
    for side, data in sides.items():
        timed = data["metrics"][args.warmup:]
        rows[side] = {"step_s": statistics.median(m["time/step"] for m in timed),
                      "update_s": statistics.median(m["time/update"] for m in timed),
                      "peak_rss_mb": data["peak_rss_mb"], "trainable": parameters[side],
                      "checkpoint_mb": data["checkpoint_mb"]}
    print(f"random Llama: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
          f"{parameters['full'] / 1e6:.1f}M parameters; LoRA rank {args.rank} on all linear layers; "
          f"{args.steps - args.warmup} timed steps per side, {args.threads} thread(s)\n")
    print("| | median step (s) | median update (s) | peak RSS (MiB) | trainable parameters | checkpoint (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, row in rows.items():
        print(f"| {side} | {row['step_s']:.2f} | {row['update_s']:.2f} | {row['peak_rss_mb']:.0f} | "
              f"{row['trainable']:,} | {row['checkpoint_mb']:.1f} |")
    lora, full = rows["lora"], rows["full"]
    print(f"| **lora / full** | **{lora['step_s'] / full['step_s']:.2f}x** | {lora['update_s'] / full['update_s']:.2f}x | "
          f"**{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x** | {lora['trainable'] / full['trainable']:.4f}x | "
          f"{lora['checkpoint_mb'] / full['checkpoint_mb']:.3f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "child")}, "parameters": parameters,
        "summary": rows, "sides": sides,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
