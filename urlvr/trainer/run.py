"""A whole run: run directory, resume, the step loop, logging, checkpoints, final export."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from urlvr.metrics.collapse import CollapseMonitor
from urlvr.metrics.evaluation import evaluate
from urlvr.metrics.loggers import JsonlLogger, console_line, make_loggers, read_jsonl
from urlvr.metrics.loggers import open_for_append, truncate_appended_files
from urlvr.metrics.tracking import PromptTrackWriter
from urlvr.recipe import Recipe, RecipeError, load_recipe
from urlvr.trainer import checkpoint
from urlvr.trainer.build import build_run
from urlvr.trainer.greedy_probe import greedy_rows
from urlvr.dist import barrier, init_distributed
from urlvr.trainer.loop import grpo_step


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
        self.run_dir = Path(self.recipe.output_dir)

    def fit(self) -> RunResult:
        recipe, run_dir = self.recipe, self.run_dir
        dist = init_distributed()
        resume_from = self._checkpoint_to_resume(dist.is_main)
        barrier()
        parts = build_run(recipe, dist)
        start_step, state = 0, {}
        if resume_from is not None:
            state = checkpoint.load_checkpoint(resume_from, parts.actor.engine, rank=dist.rank)
            parts.engine.sync_weights(parts.actor.model)  # an engine with its own weight copy
            parts.stream.load_state_dict(state["stream"])
            start_step = state["step"]
        # every rank judges collapse from the same (rank-reduced) metrics, so all stop together
        self.monitor = monitor = CollapseMonitor(recipe.collapse, state.get("collapse"))
        main = dist.is_main
        if main and self.resume:  # every per-step file back to the checkpoint: its later rows come again
            truncate_appended_files(run_dir, start_step)
        loggers = make_loggers(recipe, run_dir) if main else []
        # evaluations go to eval.jsonl (and wandb), keeping metrics.jsonl one line per step
        eval_log = [JsonlLogger(run_dir / "eval.jsonl")] + loggers[1:] if main else []
        tracks = PromptTrackWriter(run_dir / "prompts.jsonl") if main and recipe.dynamics.track_prompts else None
        result = RunResult(run_dir=run_dir)
        progress = _progress(recipe.logging.console and main, parts.total_steps, start_step)
        completions = open_for_append(run_dir / "completions.jsonl") if main else None
        last_saved, done, stopped = start_step, start_step, None
        started = time.time()
        try:
            if start_step == 0:
                if recipe.eval.at_start:
                    self._evaluate(parts, dist, 0, eval_log, result)
                self._probe_greedy(parts, dist, 0, tracks)
            for step in range(start_step + 1, parts.total_steps + 1):
                metrics, samples, prompt_rows = grpo_step(parts, recipe, dist, step)
                done = step
                result.metrics.append({"step": step, **metrics})
                alarms = monitor.observe(step, metrics)
                for logger in loggers:
                    logger.log(step, metrics)
                if completions:
                    completions.writelines(json.dumps(s) + "\n" for s in samples)
                    completions.flush()
                if tracks:
                    tracks.write(prompt_rows)
                if progress:
                    progress.console.print(console_line(step, parts.total_steps, metrics))
                    progress.advance(progress.task_ids[0])
                if recipe.dynamics.greedy_every and step % recipe.dynamics.greedy_every == 0:
                    self._probe_greedy(parts, dist, step, tracks)
                if recipe.eval.every_steps and step % recipe.eval.every_steps == 0:
                    self._evaluate(parts, dist, step, eval_log, result)
                if alarms and main:
                    _say(progress, *(f"urlvr: collapse warning: {a.message}" for a in alarms))
                act = alarms and recipe.collapse.action in ("checkpoint", "stop")
                if (recipe.trainer.save_every and step % recipe.trainer.save_every == 0) or act:
                    self._save(parts, dist, step)
                    last_saved = step
                if alarms and recipe.collapse.action == "stop":
                    stopped = alarms[0]
                    break
            if last_saved != done:
                self._save(parts, dist, done)
            ran_last = recipe.eval.every_steps and done % recipe.eval.every_steps == 0
            if recipe.eval.at_end and not ran_last and done > start_step:
                self._evaluate(parts, dist, done, eval_log, result)
            if recipe.trainer.export_final_model:
                result.final_model_dir = export_model(parts, run_dir / "final", main)
            best = monitor.best_checkpoint_step()
            if stopped is not None and best is not None:  # hand the user the best state, not the collapsed one
                checkpoint.load_checkpoint(checkpoint.checkpoint_dir(run_dir, best), parts.actor.engine, rank=dist.rank)
                result.best_model_dir = export_model(parts, run_dir / "best", main)
        finally:
            if progress:
                progress.stop()
            for logger in loggers + eval_log[:1]:
                logger.close()
            for file in (completions, tracks):
                if file:
                    file.close()
        result.stopped_early = stopped is not None
        if main:
            if stopped is not None:
                kept = f"; best checkpoint: step {best} (exported to {run_dir / 'best'})" if best is not None else ""
                _say(None, f"urlvr: stopped at step {done} ({stopped.detector}){kept}")
            summary = {
                "steps": done, "total_steps": parts.total_steps, "mode": recipe.mode,
                "last_metrics": result.metrics[-1] if result.metrics else None,
                **monitor.summary(),
                "stopped_early": None if stopped is None else {"step": stopped.step, "detector": stopped.detector},
                "best_checkpoint_step": monitor.best_checkpoint_step(),
                "evaluation": _evaluation_summary(run_dir / "eval.jsonl"),
                "wall_seconds": time.time() - started,
            }
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return result

    def _checkpoint_to_resume(self, is_main: bool) -> Path | None:
        run_dir = self.run_dir
        if self.resume:
            latest = checkpoint.latest_checkpoint(run_dir)
            if latest is None:
                raise RecipeError(f"{run_dir}: --resume given but the run has no complete checkpoint")
            return latest
        if is_main:
            if (run_dir / "metrics.jsonl").exists() or checkpoint.complete_checkpoints(run_dir):
                raise RecipeError(
                    f"{run_dir}: run directory already holds a run; pass --resume {run_dir} to continue it "
                    "or set output_dir to a new folder"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
        return None

    def _run_eval(self, parts, dist) -> dict[str, float]:
        ev, sampling = self.recipe.eval, parts.settings.eval_sampling()
        sets = {"eval": (parts.eval_records, parts.eval_prompts),
                **{f"eval/{name}": shard for name, shard in parts.held_out.items()}}
        metrics: dict[str, float] = {}
        for name, (records, prompts) in sets.items():
            with parts.generation_context():
                metrics.update(evaluate(parts.engine, records, prompts, samples_per_prompt=ev.samples_per_prompt,
                                        sampling=sampling, extractor=self.recipe.reward.extractor, name=name,
                                        greedy=ev.greedy, judge=ev.judge,
                                        extractor_kwargs=self.recipe.reward.extractor_kwargs))
        return metrics

    def _evaluate(self, parts, dist, step: int, loggers, result: RunResult) -> None:
        """One evaluation (before step 1, every K steps, or after the last step) -> eval.jsonl."""
        metrics = self._run_eval(parts, dist)
        self.monitor.observe_eval(metrics)
        result.evaluations.append({"step": step, **metrics})
        for logger in loggers:
            logger.log(step, metrics)

    def _probe_greedy(self, parts, dist, step: int, tracks: PromptTrackWriter | None) -> None:
        """Greedy decode of the tracked prompts (dynamics.greedy_every); every rank takes part."""
        if self.recipe.dynamics.greedy_every:
            rows = greedy_rows(parts, self.recipe, dist, step)
            if tracks:
                tracks.write(rows)

    def _save(self, parts, dist, step: int) -> None:
        self.monitor.record_checkpoint(step)
        best = self.monitor.best_checkpoint_step()
        state = {"step": step, "stream": parts.stream.state_dict(), "time": time.time(),
                 "collapse": self.monitor.state_dict()}
        checkpoint.save_checkpoint(self.run_dir, step, parts.actor.engine, state, rank=dist.rank,
                                   keep_last=self.recipe.trainer.keep_last, keep_steps=() if best is None else (best,))


def export_model(parts, out_dir: Path, is_main: bool) -> Path:
    """HF format (safetensors + tokenizer), loadable by AutoModelForCausalLM.from_pretrained."""
    state = parts.actor.full_state_dict()  # collective under ZeRO-3: every rank calls it
    if is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        parts.actor.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        parts.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    barrier()
    return out_dir


def _say(progress, *lines: str) -> None:
    for line in lines:
        if progress:
            progress.console.print(line)
        else:
            print(line, file=sys.stderr)


def _evaluation_summary(path: Path) -> dict | None:
    """First and last evaluation of the run and their difference (a test-time run's gain)."""
    rows = read_jsonl(path)
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    gain = {k: last[k] - first[k] for k in first if k != "step" and isinstance(first[k], (int, float))
            and isinstance(last.get(k), (int, float)) and not k.endswith("/prompts")}
    return {"first": first, "last": last, "gain": gain if last["step"] != first["step"] else {}}


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]urlvr"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress.add_task("train", total=total, completed=done)
    progress.start()
    return progress


def train(recipe: Recipe | str | Path | dict, *, resume: str | Path | None = None) -> RunResult:
    """Python API: train from a Recipe, a YAML path or a dict; returns the run directory and metrics."""
    return Trainer(recipe, resume=resume).fit()
