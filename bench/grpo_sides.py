"""The two sides of bench/trl_vs_urlvr.py: one timed GRPO run of urlvr or of TRL, in this process.

    python bench/grpo_sides.py urlvr|urlvr-packed|trl SETTINGS_JSON RESULT_JSON_PATH

The parent starts this once per side and run, so each side has a process (and a peak RSS) of its own.

What one step is, on each side (8 prompts x 4 samples = 32 sequences, one optimizer step):
- urlvr: ``time/step`` from ``metrics.jsonl`` = rollout + scoring forward + reward + advantage +
  update (micro-batches of ``micro_batch_size``, one AdamW step) + step metrics. It excludes
  writing the log line and checkpoints.
- TRL: wall time from the ``on_step_begin`` to the ``on_step_end`` callback of one optimizer step.
  With ``per_device_train_batch_size = micro_batch_size`` and ``gradient_accumulation_steps =
  32 / micro_batch_size``, TRL derives ``steps_per_generation = gradient_accumulation_steps``
  and ``generation_batch_size = 32``: the first micro-step generates and scores all 32
  completions, each micro-step then runs forward+backward on its slice, and the optimizer steps
  once. It excludes the dataloader fetch (before ``on_step_begin``) and logging (after ``on_step_end``).
The reward on both sides is TTRL's majority vote over ``\\boxed{}`` answers: urlvr's registered
``majority_vote`` on the urlvr side, ``majority_vote_scores`` below (same rule) on TRL's.
No KL, no entropy bonus, constant lr, clip 0.2, grad-norm clip 1.0, weight decay 0.01,
token-mean loss, group-std advantage scaling.
Beside wall time, each step's process CPU time is recorded (``time.process_time`` around the
same span): on a shared machine it is far less disturbed by other processes than wall time.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- shared by both children
def prompt_records(settings: dict):
    """The same synthetic arithmetic problems, in the same order, for both sides."""
    from urlvr.data.synthetic import arithmetic_problems

    return arithmetic_problems(settings["num_prompts"], settings["data_seed"])


def boxed_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` content with whitespace and a trailing ``.`` dropped, integers
    canonicalised (``07`` -> ``7``); None when there is none (urlvr's ``boxed`` extractor, minus
    its rarer normalisations, so that the bench does not depend on urlvr internals)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for end in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            answer = text[start + len("\\boxed{") : end].replace(" ", "").rstrip(".")
            return str(int(answer)) if re.fullmatch(r"[-+]?\d+", answer) else (answer or None)
    return None  # cut inside the box


def majority_vote_scores(completions: Sequence[str], group_size: int) -> list[float]:
    """TTRL's r(y_j) = 1[ans(y_j) = maj(x)] over groups of ``group_size`` consecutive completions;
    no answer scores 0 and does not vote; a tie goes to the answer seen first (as urlvr's default)."""
    scores: list[float] = []
    for start in range(0, len(completions), group_size):
        answers = [boxed_answer(c) for c in completions[start : start + group_size]]
        counts = Counter(a for a in answers if a is not None)
        majority = counts.most_common(1)[0][0] if counts else None
        scores.extend(float(a is not None and a == majority) for a in answers)
    return scores


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "deepspeed", "accelerate", "datasets", "urlvr"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    import importlib.util
    import subprocess

    # which urlvr tree ran: an editable install can point at a checkout other than this one
    spec = importlib.util.find_spec("urlvr")
    source = Path(spec.origin).parent.parent if spec and spec.origin else None
    found["urlvr_source"] = str(source) if source else None
    if source is not None:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        found["urlvr_commit"] = commit.stdout.strip() or None
    return found


class TimedSpans:
    """Wall and CPU time of each step; with ``profile_to`` set, a pyinstrument profile of the
    timed (post-warm-up) steps only, written there as text (it slows the steps it profiles)."""

    def __init__(self, warmup_steps: int, total_steps: int, profile_to: str | None) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_step_epoch: float | None = None  # time.time() when step 1 began: start-up ends here
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.profiler = None
        if profile_to:
            from pyinstrument import Profiler  # in .venv-bench; see bench/README.md

            self.profiler, self.profile_to = Profiler(interval=0.001), Path(profile_to)

    def begin(self) -> None:
        if self.first_step_epoch is None:
            self.first_step_epoch = time.time()
        if self.profiler is not None and len(self.wall) == self.warmup_steps:
            self.profiler.start()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)
        if self.profiler is not None and len(self.wall) == self.total_steps:
            self.profiler.stop()
            tree = self.profiler.output_text(unicode=True, show_all=True)  # library frames too: TRL's time is there
            flat = self.profiler.output_text(unicode=True, flat=True).splitlines()[:60]  # top self times
            self.profile_to.write_text("Self time by function (top):\n" + "\n".join(flat) + "\n\n" + tree)


# --------------------------------------------------------------------------- padding, floor, token budget
class PaddingCounter:
    """Counts the positions fed to the model's body (a ``*Model`` module such as ``LlamaModel``)
    in forwards that build a graph (the update), and how many of them are padding (attention
    mask 0). The same count on both sides, neither trainer modified: ``nn.Module.__call__`` is
    wrapped for the child's life (global forward hooks would not see keyword arguments)."""

    active: PaddingCounter | None = None  # the counter of this child, paused by the floor measurement

    def __init__(self) -> None:
        self.positions = self.real = self.calls = 0
        self.paused = False

    def count(self, module, args, kwargs) -> None:
        import torch

        if self.paused or not torch.is_grad_enabled() or not hasattr(module, "embed_tokens") or not hasattr(module, "layers"):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        mask = kwargs.get("attention_mask")
        self.calls += 1
        self.positions += ids.numel()
        self.real += int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.numel()

    def __enter__(self) -> PaddingCounter:
        import torch

        self._original_call = original_call = torch.nn.Module.__call__

        def call(module, *args, **kwargs):
            self.count(module, args, kwargs)
            return original_call(module, *args, **kwargs)

        torch.nn.Module.__call__ = call
        PaddingCounter.active = self
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.nn.Module.__call__ = self._original_call

    def summary(self) -> dict:
        return {"calls": self.calls, "positions": self.positions, "real_tokens": self.real,
                "padding_fraction": 1 - self.real / self.positions if self.positions else None}


class RecordedRollouts:
    """Records (prompt ids, response ids) of every sample urlvr's transformers engine returns, per call."""

    def __init__(self) -> None:
        self.sequences: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = []

    def __enter__(self) -> RecordedRollouts:
        from urlvr.rollout.transformers_engine import TransformersRolloutEngine

        self._original = original = TransformersRolloutEngine.generate
        recorded = self

        def generate(engine, prompts, group_size, sampling):
            groups = original(engine, prompts, group_size, sampling)
            recorded.sequences.append([(g.prompt.token_ids, s.token_ids) for g in groups for s in g.samples])
            return groups

        TransformersRolloutEngine.generate = generate
        return self

    def __exit__(self, *exc) -> None:
        from urlvr.rollout.transformers_engine import TransformersRolloutEngine

        TransformersRolloutEngine.generate = self._original


def floor_forward_backward(model_path: str, steps: list[list[tuple[tuple[int, ...], tuple[int, ...]]]]) -> dict[str, list[float]]:
    """Per step: one forward + backward over that step's sequences with no padding at all (one
    sequence per call, exact length), a summed response log-prob as the loss. The LM head runs
    only where a response token is predicted (`logits_to_keep`), as a trainer must. Same model
    shape, fresh weights from disk (the compute does not depend on their values)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    if PaddingCounter.active is not None:  # these forwards are no part of the update's padding count
        PaddingCounter.active.paused = True
    times, cpu_times = [], []
    for sequences in steps:
        started, started_cpu = time.perf_counter(), time.process_time()
        for prompt, response in sequences:
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids, logits_to_keep=len(response) + 1).logits[0, :-1]  # [T, V]
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[0, len(prompt) :, None])
            logprobs.sum().backward()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - started_cpu)
        model.zero_grad(set_to_none=True)
    return {"wall": times, "cpu": cpu_times}


def urlvr_token_budget(settings: dict) -> int | None:
    """``trainer.max_tokens_per_micro_batch`` when urlvr's recipe has it (feature-detected), sized
    to the memory of a fixed micro-batch of full-length sequences; None when it does not."""
    from urlvr.recipe.sections.optimisation import TrainerSection

    if "max_tokens_per_micro_batch" not in TrainerSection.model_fields or not settings.get("token_budget", True):
        return None
    return settings["micro_batch_size"] * (settings["max_new_tokens"] + settings.get("prompt_tokens_max", 64))


# --------------------------------------------------------------------------- urlvr child
def run_urlvr(settings: dict, work_dir: Path) -> dict:
    import urlvr

    total_steps = settings["warmup_steps"] + settings["timed_steps"]
    recipe = {
        "seed": settings["seed"],
        "output_dir": str(work_dir / "run"),
        "model": {"path": settings["model"]},
        "data": {"source": {"kind": "arithmetic", "num_problems": settings["num_prompts"], "seed": settings["data_seed"]},
                 "template": "chat", "shuffle": False},
        "rollout": {"group_size": settings["group_size"], "max_new_tokens": settings["max_new_tokens"],
                    "engine": {"name": "transformers", "generation_batch_size": settings.get("generation_batch_size", 64)},
                    "temperature": settings["temperature"], "top_p": 1.0, "top_k": 0},
        # the oracle (ground-truth reward for metrics) is off: TRL computes no such extra reward
        "reward": {"terms": [{"name": "majority_vote"}], "extractor": "boxed", "oracle": None},
        "algorithm": {"kl_coef": 0.0, "entropy_coef": 0.0, "loss": {"name": "ppo_clip", "clip_eps_low": 0.2, "clip_eps_high": 0.2},
                      "loss_aggregation": "token-mean"},
        # TRL's optimizer (HF Trainer's) spares norm gains and biases from weight decay; so does this side
        "optim": {"lr": settings["lr"], "weight_decay": 0.01, "weight_decay_exclude": "norms_and_biases",
                  "grad_clip": 1.0, "schedule": "constant",
                  "deepspeed": {"precision": "bf16" if settings.get("bf16") else "fp32"}},
        "trainer": {"total_steps": total_steps, "prompts_per_step": settings["prompts_per_step"],
                    "prompts_per_minibatch": settings["prompts_per_step"],
                    "micro_batch_size": settings["micro_batch_size"], "save_every": 0, "export_final_model": False},
        "logging": {"console": False, "completions_per_step": 0},
    }
    token_budget = urlvr_token_budget(settings)
    if token_budget is not None:
        recipe["trainer"]["max_tokens_per_micro_batch"] = token_budget
        del recipe["trainer"]["micro_batch_size"]  # not used beside a budget (and refused there)
        if settings.get("padding_free"):
            recipe["trainer"]["padding_free"] = True
    rollouts = RecordedRollouts()
    # CPU time (and the profile) of the same span as time/step: wrap the step function the loop calls
    import urlvr.trainer.run as run_module

    step_fn, spans = run_module.grpo_step, TimedSpans(settings["warmup_steps"], total_steps, settings["profile_urlvr"])

    def timed_step(*args, **kwargs):
        spans.begin()
        try:
            return step_fn(*args, **kwargs)
        finally:
            spans.end()

    run_module.grpo_step = timed_step
    started = time.perf_counter()
    with rollouts:
        urlvr.train(recipe)
    train_seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (work_dir / "run" / "metrics.jsonl").read_text().splitlines() if line]
    stage_keys = sorted(k for k in rows[0] if k.startswith("time/"))
    return {
        "step_times": [row["time/step"] for row in rows],
        # None if the loop no longer calls run.grpo_step (the wrapper then never ran)
        "step_cpu_times": spans.cpu if len(spans.cpu) == len(rows) else None,
        "tokens_per_step": [row["perf/response_tokens"] for row in rows],
        "stages": {key: [row[key] for row in rows] for key in stage_keys},
        "train_call_seconds": train_seconds,
        "first_step_epoch": spans.first_step_epoch,
        "max_tokens_per_micro_batch": token_budget,
        # urlvr's floor: its own rollout + one forward/backward over the same sequences, unpadded
        "floor_forward_backward_s": (floor_forward_backward(settings["model"], rollouts.sequences[-settings["timed_steps"]:])
                                     if settings.get("measure_floor") else None),
    }


# --------------------------------------------------------------------------- TRL child
def run_trl(settings: dict, work_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    group_size = settings["group_size"]
    sequences_per_step = settings["prompts_per_step"] * group_size
    if sequences_per_step % settings["micro_batch_size"]:
        raise ValueError(f"micro_batch_size must divide {sequences_per_step}")
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                           add_generation_prompt=True) for r in prompt_records(settings)]
    # TRL tokenizes plain-text prompts with special tokens on; urlvr with them off. Same ids here?
    same_ids = all(tokenizer(t)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    dataset = Dataset.from_dict({"prompt": texts})

    def majority_vote(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        for start in range(0, len(prompts), group_size):  # groups must be whole and consecutive
            if len(set(prompts[start : start + group_size])) != 1:
                raise RuntimeError("TRL reward batch is not made of consecutive prompt groups")
        return majority_vote_scores(completions, group_size)

    total_steps = settings["warmup_steps"] + settings["timed_steps"]
    spans = TimedSpans(settings["warmup_steps"], total_steps, settings["profile_trl"])

    class StepTimer(TrainerCallback):
        """One optimizer step = on_step_begin .. on_step_end; keeps the per-generation logs."""

        def __init__(self) -> None:
            self.logs: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            spans.begin()

        def on_step_end(self, args, state, control, **kwargs):
            spans.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    config = GRPOConfig(
        output_dir=str(work_dir / "trl"),
        max_steps=total_steps,
        per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=sequences_per_step // settings["micro_batch_size"],
        # steps_per_generation defaults to gradient_accumulation_steps: one generation per optimizer step
        num_generations=group_size,
        max_completion_length=settings["max_new_tokens"],
        temperature=settings["temperature"], top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=settings["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        max_grad_norm=1.0,
        # TRL turns activation checkpointing on by default; urlvr's recipe default is off
        gradient_checkpointing=settings["trl_gradient_checkpointing"],
        use_vllm=False, use_cpu=not settings.get("cuda"), bf16=bool(settings.get("bf16")), fp16=False,
        model_init_kwargs={"dtype": torch.bfloat16 if settings.get("bf16") else torch.float32},
        shuffle_dataset=False, seed=settings["seed"], dataloader_num_workers=0,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, log_completions=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=settings["model"], reward_funcs=majority_vote, args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    derived = {"per_device_train_batch_size": config.per_device_train_batch_size,
               "gradient_accumulation_steps": config.gradient_accumulation_steps,
               "steps_per_generation": config.steps_per_generation,
               "generation_batch_size": config.generation_batch_size, "num_generations": config.num_generations,
               "loss_type": config.loss_type, "gradient_checkpointing": config.gradient_checkpointing,
               "prompt_ids_equal_urlvr": same_ids}
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    if len(spans.wall) != total_steps or len(timer.logs) != total_steps:
        raise RuntimeError(f"expected {total_steps} steps with one generation each, got "
                           f"{len(spans.wall)} steps and {len(timer.logs)} generation logs")
    return {
        "step_times": spans.wall,
        "step_cpu_times": spans.cpu,
        "tokens_per_step": [log["completions/mean_length"] * sequences_per_step for log in timer.logs],
        # TRL's own step_time: sum of training_step calls (generation + fwd/bwd), no optimizer step
        "trl_reported_step_time": [log.get("step_time") for log in timer.logs],
        "trl_config": derived,
        "train_call_seconds": train_seconds,
        "first_step_epoch": spans.first_step_epoch,
    }


def child_main(side: str, settings: dict, result_path: Path) -> None:
    import torch

    torch.set_num_threads(settings["threads"])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{side}-", dir=RESULTS_DIR) as work, PaddingCounter() as padding:
        if side.startswith("urlvr"):  # urlvr-packed: the same run with trainer.padding_free
            raw = run_urlvr({**settings, "padding_free": side == "urlvr-packed"}, Path(work))
        else:
            raw = run_trl(settings, Path(work))
    raw["training_forwards"] = padding.summary()
    if torch.cuda.is_available():
        raw["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        raw["gpu"] = torch.cuda.get_device_name()
    raw.update(side=side, peak_rss_mib=peak_rss_mib(), process_seconds=time.perf_counter() - started,
               torch_threads=torch.get_num_threads(), versions=versions(), python=sys.executable)
    result_path.write_text(json.dumps(raw))


if __name__ == "__main__":
    side, settings, result = sys.argv[1:4]
    if side not in ("urlvr", "urlvr-packed", "trl"):
        raise SystemExit(f"usage: python {sys.argv[0]} urlvr|urlvr-packed|trl SETTINGS_JSON RESULT_JSON_PATH")
    child_main(side, json.loads(settings), Path(result))
