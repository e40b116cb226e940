"""A whole run: run directory, resume, the step loop, logging, checkpoints, final export."""

from __future__ import annotations

import json
import sys
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from urlvr.metrics.collapse import Alarm, CollapseMonitor
from urlvr.metrics.evaluation import evaluate
from urlvr.metrics.loggers import read_jsonl
from urlvr.recipe import Recipe, RecipeError, load_recipe
from urlvr.recipe.changes import FieldChange
from urlvr.dist import barrier, init_distributed
from urlvr.progress import format_seconds
from urlvr.trainer import checkpoint
from urlvr.trainer.build import build_run
from urlvr.trainer.greedy_probe import greedy_rows
from urlvr.trainer.loop import grpo_step
from urlvr.trainer.outputs import RunOutputs
from urlvr.trainer.reference_answers import check_restored, reference_shares
from urlvr.trainer.resume import record_resume, resume_changes


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, float]] = field(default_factory=list)  # this invocation's steps
    final_model_dir: Path | None = None
    evaluations: list[dict[str, float]] = field(default_factory=list)  # this invocation's evaluations
    best_model_dir: Path | None = None  # exported when collapse.action=stop ended the run
    stopped_early: bool = False  # a collapse alarm stopped the run (collapse.action=stop)


class Trainer:
    """`Trainer(recipe).fit()`; `resume=RUN_DIR` continues that run from its latest checkpoint."""

    def __init__(self, recipe: Recipe | str | Path | dict, *, resume: str | Path | None = None) -> None:
        self.recipe = load_recipe(recipe)
        if resume is not None:
            self.recipe = self.recipe.model_copy(update={"output_dir": Path(resume)})
        self.resume = resume is not None
        self.changes: list[FieldChange] = []  # what this resume changes (main rank; trainer/resume.py)
        self.run_dir = Path(self.recipe.output_dir)
        self._preflight()

    def _preflight(self) -> None:
        """The run-directory mistakes a user makes most, caught before the slow start-up (model
        load, process group); `fit` checks again on every rank."""
        if os.environ.get("RANK", "0") != "0":
            return
        if self.resume and not self.run_dir.is_dir():
            raise RecipeError(f"{self.run_dir}: --resume names a folder that does not exist")
        if not self.resume:
            _refuse_a_folder_holding_a_run(self.run_dir)
        latest = checkpoint.latest_checkpoint(self.run_dir) if self.resume else None
        if latest is not None:  # a change the checkpoint cannot honour fails before the model loads
            resume_changes(self.run_dir, self.recipe, checkpoint.checkpoint_step(latest))

    def fit(self) -> RunResult:
        try:
            return self._fit()
        finally:  # the folder is free when the run returns (or raises), not when the Trainer is collected
            lock, self._lock = getattr(self, "_lock", None), None
            if lock is not None:
                lock.close()

    def _fit(self) -> RunResult:
        recipe, run_dir = self.recipe, self.run_dir
        dist = init_distributed()
        resume_from = self._checkpoint_to_resume(dist.rank)
        barrier()
        checkpoint.check_shared_run_dir(run_dir, is_main=dist.is_main)  # several nodes: one shared folder
        total = recipe.trainer.total_steps  # None: counted from the data, once it is loaded
        if resume_from is not None and total is not None and checkpoint.checkpoint_step(resume_from) >= total:
            # known before the model loads, and before a generation server starts (rollout.engine: server)
            _say_finished(dist, checkpoint.checkpoint_step(resume_from), total)
            return RunResult(run_dir=run_dir)
        parts = build_run(recipe, dist)
        try:
            return self._fit_parts(parts, dist, resume_from)
        finally:  # a generation server urlvr started stops with the run (rollout.engine: server)
            getattr(parts.engine, "close", lambda: None)()

    def _fit_parts(self, parts, dist, resume_from: Path | None) -> RunResult:
        recipe, run_dir = self.recipe, self.run_dir
        start_step, state = self._restore(parts, dist, resume_from)
        shaping = recipe.algorithm.advantage_shaping
        wants_reference_answers = getattr(shaping, "wants_reference_answers", False)  # RESTRAIN's prompt weights
        if resume_from is not None and wants_reference_answers:
            # refused before the resume is recorded or any output opens: a refused resume leaves the folder as it was
            check_restored(parts.advantage_state, (r.prompt_id for r in parts.stream.records), shaping.name)
        # every rank judges collapse from the same (rank-reduced) metrics, so all stop together
        self.monitor = CollapseMonitor(recipe.collapse, state.get("collapse"))
        result, started = RunResult(run_dir=run_dir), time.time()
        if start_step >= parts.total_steps:  # a finished run: nothing in its folder changes
            _say_finished(dist, start_step, parts.total_steps)
            return result
        with RunOutputs(recipe, run_dir, main=dist.is_main, total_steps=parts.total_steps, start_step=start_step,
                        resume=self.resume) as out:
            if resume_from is not None:
                out.say(f"urlvr: resuming from step {start_step} ({resume_from})")
                if dist.is_main:
                    self._record_changes(start_step, out)
            if start_step == 0:  # the starting point: evaluation and greedy probe before any update
                if wants_reference_answers:
                    parts.advantage_state = reference_shares(parts, dist, out.say)  # trainer/reference_answers.py
                if recipe.eval.at_start:
                    self._evaluate(parts, 0, out, result)
                self._probe_greedy(parts, dist, 0, out)
            done, stopped = self._train(parts, dist, start_step, out, result)
            best = self._finish(parts, dist, start_step, done, stopped, out, result)
        result.stopped_early = stopped is not None
        if dist.is_main:
            self._write_summary(parts, done, stopped, best, result, time.time() - started)
        return result

    def _train(self, parts, dist, start_step: int, out: RunOutputs, result: RunResult) -> tuple[int, Alarm | None]:
        """The step loop: a GRPO step, its outputs, the periodic probes, evaluations and
        checkpoints; returns (last step done, the alarm that stopped the run or None)."""
        recipe, done = self.recipe, start_step
        for step in range(start_step + 1, parts.total_steps + 1):
            metrics, completions, prompt_rows = grpo_step(parts, dist, step)
            done = step
            result.metrics.append({"step": step, **metrics})
            alarms = self.monitor.observe(step, metrics)
            out.step(step, metrics, completions, prompt_rows)
            if _due(recipe.dynamics.greedy_every, step):
                self._probe_greedy(parts, dist, step, out)
            if _due(recipe.eval.every_steps, step):
                self._evaluate(parts, step, out, result)
            out.say(*(f"urlvr: collapse warning: {a.message}" for a in alarms))
            if _due(recipe.trainer.save_every, step) or (alarms and recipe.collapse.action in ("checkpoint", "stop")):
                self._save(parts, dist, step)
            if alarms and recipe.collapse.action == "stop":
                return done, alarms[0]
        return done, None

    def _finish(self, parts, dist, start_step: int, done: int, stopped: Alarm | None, out: RunOutputs,
                result: RunResult) -> int | None:
        """Last checkpoint, the at-end evaluation, the exports; returns the best checkpoint's step."""
        recipe = self.recipe
        if self.last_saved != done:
            self._save(parts, dist, done)
        if recipe.eval.at_end and not _due(recipe.eval.every_steps, done) and done > start_step:
            self._evaluate(parts, done, out, result)
        if recipe.trainer.export_final_model:
            result.final_model_dir = export_model(parts, self.run_dir / "final", dist.is_main)
        best = self.monitor.best_checkpoint_step()
        if stopped is not None and best is not None:  # hand the user the best state, not the collapsed one
            checkpoint.load_checkpoint(checkpoint.checkpoint_dir(self.run_dir, best), parts.actor.engine, rank=dist.rank)
            result.best_model_dir = export_model(parts, self.run_dir / "best", dist.is_main)
        if stopped is not None:
            kept = f"; best checkpoint: step {best} (exported to {self.run_dir / 'best'})" if best is not None else ""
            out.say(f"urlvr: stopped at step {done} ({stopped.detector}){kept}")
        return best

    def _write_summary(self, parts, done: int, stopped: Alarm | None, best: int | None, result: RunResult,
                       wall_seconds: float) -> None:
        summary = {
            "steps": done, "total_steps": parts.total_steps, "mode": self.recipe.mode,
            "last_metrics": result.metrics[-1] if result.metrics else None,
            **self.monitor.summary(),
            "stopped_early": None if stopped is None else {"step": stopped.step, "detector": stopped.detector},
            "best_checkpoint_step": best,
            "evaluation": _evaluation_summary(self.run_dir / "eval.jsonl"),
            "wall_seconds": wall_seconds,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def _restore(self, parts, dist, resume_from: Path | None) -> tuple[int, dict]:
        """(the step to continue after, the checkpoint's trainer state): weights, optimizer, RNG,
        data position; an engine with its own weight copy is synced to them."""
        self.last_saved = 0
        if resume_from is None:
            return 0, {}
        universal = checkpoint.prepare_reshard(resume_from, world_size=dist.world_size, is_main=dist.is_main,
                                               zero_stage=self.recipe.optim.deepspeed.zero_stage)
        state = checkpoint.load_checkpoint(resume_from, parts.actor.engine, rank=dist.rank, universal=universal)
        parts.actor.restart_lr_schedule()  # the recipe's schedule (perhaps extended) from the next step on
        parts.producer.sync(parts.actor.model, version=state["step"])
        parts.stream.load_state_dict(state["stream"])
        parts.advantage_state = state.get("advantage_shaping", {})
        parts.producer.load_state_dict(checkpoint.load_rollouts(resume_from))
        self.last_saved = state["step"]
        return state["step"], state

    def _checkpoint_to_resume(self, rank: int) -> Path | None:
        run_dir = self.run_dir
        if rank == 0:
            self._lock = checkpoint.lock_run_dir(run_dir)  # held until fit returns (or the process ends)
        if self.resume:
            latest = checkpoint.agreed_latest_checkpoint(run_dir)  # every rank must see the same one
            if rank == 0:  # said and recorded once the run is sure to train (a finished run stays untouched)
                self.changes = resume_changes(run_dir, self.recipe, checkpoint.checkpoint_step(latest))
            return latest
        if rank == 0:
            _refuse_a_folder_holding_a_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
        return None

    def _record_changes(self, step: int, out: RunOutputs) -> None:
        """Say each field this resume changes (old -> new) and record the recipe that now trains
        (`recipe.resume-<step>.yaml`); main rank only (trainer/resume.py)."""
        if self.changes:
            path = record_resume(self.run_dir, self.recipe, step)
            count = len(self.changes)
            out.say(f"urlvr: resuming from step {step} with {count} changed field{'s' if count > 1 else ''} "
                    f"(recorded in {path}):", *(f"  {change}" for change in self.changes))

    def _run_eval(self, parts) -> dict[str, float]:
        ev, sampling = self.recipe.eval, parts.settings.eval_sampling()
        sets = {"eval": (parts.eval_records, parts.eval_prompts),
                **{f"eval/{name}": shard for name, shard in parts.held_out.items()}}
        metrics: dict[str, float] = {}
        for name, (records, prompts) in sets.items():
            with parts.generation_context():
                metrics.update(evaluate(parts.engine, records, prompts, samples_per_prompt=ev.samples_per_prompt,
                                        sampling=sampling, extractor=parts.settings.extract, name=name,
                                        greedy=ev.greedy, judge=ev.judge,
                                        answer_from_truncated=self.recipe.reward.answer_from_truncated))
        return metrics

    def _evaluate(self, parts, step: int, out: RunOutputs, result: RunResult) -> None:
        """One evaluation (before step 1, every K steps, or after the last step) -> eval.jsonl.
        A line before and one after: an evaluation of hundreds of prompts is one long silence in a
        log file otherwise (the step lines stop while it runs)."""
        prompts = len(parts.eval_prompts) + sum(len(p) for _, p in parts.held_out.values())
        out.say(f"urlvr: evaluating at step {step}: {prompts} prompts x {self.recipe.eval.samples_per_prompt} samples"
                + (" on this rank" if parts.settings.world_size > 1 else ""))
        started = time.time()
        metrics = self._run_eval(parts)
        out.say(f"urlvr: evaluated at step {step} in {format_seconds(time.time() - started)}")
        self.monitor.observe_eval(metrics)
        result.evaluations.append({"step": step, **metrics})
        out.evaluation(step, metrics)

    def _probe_greedy(self, parts, dist, step: int, out: RunOutputs) -> None:
        """Greedy decode of the tracked prompts (dynamics.greedy_every); every rank takes part."""
        if self.recipe.dynamics.greedy_every:
            out.prompt_rows(greedy_rows(parts, self.recipe, dist, step))

    def _save(self, parts, dist, step: int) -> None:
        self.last_saved = step
        self.monitor.record_checkpoint(step)
        best = self.monitor.best_checkpoint_step()
        in_flight = parts.producer.state_dict()  # waits for the rollouts in flight (max_staleness > 0)
        state = {"step": step, "stream": parts.stream.state_dict(), "time": time.time(),
                 "advantage_shaping": parts.advantage_state,
                 "collapse": self.monitor.state_dict(), "world_size": dist.world_size, "in_flight_steps":
                 [entry["step"] for entry in in_flight]}
        checkpoint.save_checkpoint(self.run_dir, step, parts.actor.engine, state, rank=dist.rank,
                                   keep_last=self.recipe.trainer.keep_last, keep_steps=() if best is None else (best,),
                                   rollouts=in_flight)


def _say_finished(dist, step: int, total_steps: int) -> None:
    if dist.is_main:
        print(f"urlvr: the run is already at step {step} of {total_steps}: nothing to train (raise "
              f"trainer.total_steps, e.g. --set trainer.total_steps={step + 10}, to continue)", file=sys.stderr)


def export_model(parts, out_dir: Path, is_main: bool) -> Path:
    """HF format (safetensors + tokenizer), loadable by AutoModelForCausalLM.from_pretrained. A LoRA
    run writes its adapter instead (`PeftModel.from_pretrained(base, out_dir)`), and with
    `model.lora.export_merged` the merged model in `out_dir/merged` (docs/lora.md)."""
    actor, lora = parts.actor, parts.settings.recipe.model.lora
    # collective under ZeRO-3: every rank gathers
    state = actor.adapter_state_dict() if lora is not None else actor.full_state_dict()
    merged = actor.full_state_dict() if lora is not None and lora.export_merged else None
    if is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        actor.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        parts.tokenizer.save_pretrained(tmp)
        if merged is not None:
            actor.model.get_base_model().save_pretrained(tmp / "merged", state_dict=merged, safe_serialization=True)
            parts.tokenizer.save_pretrained(tmp / "merged")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    barrier()
    return out_dir


def _due(every: int, step: int) -> bool:
    """A periodic action (every K steps; K = 0 means never) falls on this step."""
    return bool(every) and step % every == 0


def _evaluation_summary(path: Path) -> dict | None:
    """First and last evaluation of the run and their difference (a test-time run's gain)."""
    rows = read_jsonl(path)
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    gain = {k: last[k] - first[k] for k in first if k != "step" and isinstance(first[k], (int, float))
            and isinstance(last.get(k), (int, float)) and not k.endswith("/prompts")}
    return {"first": first, "last": last, "gain": gain if last["step"] != first["step"] else {}}


def _refuse_a_folder_holding_a_run(run_dir: Path) -> None:
    """RecipeError when `run_dir` holds a run, naming the way out: `--resume` when it has a
    complete checkpoint, else (stopped before its first one) deleting the folder, as nothing can
    be resumed and `--resume` would be refused."""
    if checkpoint.complete_checkpoints(run_dir):
        raise RecipeError(f"{run_dir}: run directory already holds a run; pass --resume {run_dir} to continue it "
                          "or set output_dir to a new folder")
    if (run_dir / "metrics.jsonl").exists():
        raise RecipeError(f"{run_dir}: run directory holds a run that stopped before its first checkpoint "
                          "(trainer.save_every), so nothing can be resumed: delete the folder to start over, or set "
                          "output_dir to a new folder")


def train(recipe: Recipe | str | Path | dict, *, resume: str | Path | None = None) -> RunResult:
    """Python API: train from a Recipe, a YAML path or a dict; returns the run directory and metrics."""
    return Trainer(recipe, resume=resume).fit()
