"""End-to-end GRPO on CPU (single process): on-policy ratio, resume, atomic checkpoints, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import urlvr
from conftest import small_run_recipe
from urlvr.trainer.checkpoint import complete_checkpoints, latest_checkpoint

TESTS = Path(__file__).resolve().parent
REWARD = {"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"}
VOLATILE = ("time/", "perf/tokens_per_second")


def recipe_for(random_tiny_model, out: Path, **sections) -> dict:
    sections = {"plugins": ["reward_plugins"], "reward": REWARD, **sections}
    return small_run_recipe(random_tiny_model[0], out, **sections)


def stable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in metrics]


def test_on_policy_ratio_is_exactly_one(random_tiny_model, tmp_path):
    result = urlvr.train(recipe_for(random_tiny_model, tmp_path / "run"))
    for m in result.metrics:
        assert m["actor/ratio_min"] == 1.0 and m["actor/ratio_max"] == 1.0
        assert m["actor/clip_fraction"] == 0.0
        assert m["actor/optimizer_steps_per_rollout"] == 1.0
    assert result.metrics[0]["loss/policy"] != 0.0  # the reward varies, so the update is real


def test_off_policy_minibatches_move_the_ratio(random_tiny_model, tmp_path):
    """Control for the test above: with 2 mini-batches the second sees updated weights."""
    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"prompts_per_minibatch": 2, "total_steps": 1})
    result = urlvr.train(recipe)
    assert result.metrics[0]["actor/optimizer_steps_per_rollout"] == 2.0
    assert result.metrics[0]["actor/ratio_max"] > 1.0 or result.metrics[0]["actor/ratio_min"] < 1.0


def test_rewards_see_whole_groups(random_tiny_model, tmp_path):
    import reward_plugins

    reward_plugins.SEEN_GROUPS.clear()
    urlvr.train(recipe_for(random_tiny_model, tmp_path / "run"))
    assert len(reward_plugins.SEEN_GROUPS) == 2 * 4  # steps x prompts: one call per group
    assert all(size == 4 for _, size, _ in reward_plugins.SEEN_GROUPS)


def test_a_reward_reading_labels_without_permission_fails(random_tiny_model, tmp_path):
    from urlvr.rewards.base import LabelAccessError

    recipe = recipe_for(random_tiny_model, tmp_path / "run", reward={"terms": [{"name": "test_peeks_at_label"}]})
    with pytest.raises(LabelAccessError):
        urlvr.train(recipe)


def test_resume_continues_exactly(random_tiny_model, tmp_path, capsys):
    straight = urlvr.train(recipe_for(random_tiny_model, tmp_path / "straight", trainer={"total_steps": 4}))
    first = urlvr.train(recipe_for(random_tiny_model, tmp_path / "split", trainer={"total_steps": 2}))
    assert [c.name for c in complete_checkpoints(first.run_dir)] == ["step-000002"]
    capsys.readouterr()
    resumed = urlvr.train(recipe_for(random_tiny_model, tmp_path / "ignored", trainer={"total_steps": 4}),
                          resume=first.run_dir)
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    # the changed field is said and the recipe that trained steps 3-4 recorded beside the first one
    assert "  trainer.total_steps: 2 -> 4\n" in capsys.readouterr().err
    import yaml

    assert yaml.safe_load((first.run_dir / "recipe.yaml").read_text())["trainer"]["total_steps"] == 2
    assert yaml.safe_load((first.run_dir / "recipe.resume-2.yaml").read_text())["trainer"]["total_steps"] == 4
    assert stable(first.metrics + resumed.metrics) == stable(straight.metrics)
    logged = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    a = load_file(straight.final_model_dir / "model.safetensors")
    b = load_file(resumed.final_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows_by_file(run_dir: Path) -> dict[str, list[dict]]:
    from urlvr.metrics.loggers import APPENDED_FILES, read_jsonl

    return {name: stable(read_jsonl(run_dir / name)) for name in APPENDED_FILES}


def test_resume_after_a_kill_between_logging_and_checkpoint_writes_every_appended_file_once(
    random_tiny_model, tmp_path, monkeypatch,
):
    """Step 3 logged everywhere, then killed before its checkpoint (the last is step 2): the resumed
    run rewrites steps 3 and 4, and every per-step file equals an uninterrupted run's, row for row."""
    from urlvr.metrics.loggers import APPENDED_FILES
    from urlvr.trainer import run as run_module

    everything = dict(
        trainer={"total_steps": 4, "save_every": 2},
        eval={"at_start": True, "every_steps": 1, "at_end": True, "samples_per_prompt": 2, "max_new_tokens": 4,
              "source": {"kind": "arithmetic", "num_problems": 2, "seed": 99}},
        dynamics={"track_prompts": "all", "greedy_every": 1},
        logging={"console": False, "completions_per_step": 3},
    )
    straight = urlvr.train(recipe_for(random_tiny_model, tmp_path / "straight", **everything))
    expected = _rows_by_file(straight.run_dir)
    assert all(expected[name] for name in APPENDED_FILES), "every per-step file should be written"
    # no other file grows step by step: anything new beside these must be registered in APPENDED_FILES
    assert {p.name for p in straight.run_dir.iterdir() if p.is_file()} == {*APPENDED_FILES, "recipe.yaml", "summary.json", ".urlvr.lock"}

    recipe = recipe_for(random_tiny_model, tmp_path / "killed", **everything)
    real_step = run_module.grpo_step

    def killed_at_step_4(parts, dist, step):
        if step == 4:
            raise KeyboardInterrupt("killed")  # after step 3's rows and evaluation, before any step-3 checkpoint
        return real_step(parts, dist, step)

    monkeypatch.setattr(run_module, "grpo_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        urlvr.train(recipe)
    monkeypatch.setattr(run_module, "grpo_step", real_step)
    run_dir = tmp_path / "killed"
    assert [c.name for c in complete_checkpoints(run_dir)] == ["step-000002"]
    assert {row["step"] for row in _rows_by_file(run_dir)["completions.jsonl"]} == {1, 2, 3}
    urlvr.train(recipe, resume=run_dir)
    resumed = _rows_by_file(run_dir)
    for name in APPENDED_FILES:
        assert resumed[name] == expected[name], name


def test_resume_drops_a_row_torn_by_a_kill_mid_write(tmp_path):
    from urlvr.metrics.loggers import truncate_appended_files

    (tmp_path / "completions.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "resp')
    (tmp_path / "eval.jsonl").write_text('{"step": 0}\n{"step": 2}\n\n{"step": 4}\n')
    truncate_appended_files(tmp_path, 2)
    assert (tmp_path / "completions.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / "eval.jsonl").read_text() == '{"step": 0}\n{"step": 2}\n'
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unregistered_per_step_file_is_refused(tmp_path):
    from urlvr.metrics.loggers import open_for_append

    with pytest.raises(ValueError, match="APPENDED_FILES"):
        open_for_append(tmp_path / "detectors.jsonl")


def test_resume_refuses_changes_the_checkpoint_cannot_honour_and_names_each(random_tiny_model, tmp_path):
    """optim.lr would be overwritten by the restored optimizer state, model.path by the restored
    weights: refused before anything loads, one line each, old -> new and why. A change the
    checkpoint does not fix (rollout.group_size) is allowed and recorded."""
    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"total_steps": 1})
    urlvr.train(recipe)
    changed = {**recipe, "optim": {**recipe.get("optim", {}), "lr": 0.5}, "model": {"path": "urlvr/tiny"}}
    with pytest.raises(urlvr.RecipeError) as info:
        urlvr.train(changed, resume=tmp_path / "run")
    lines = str(info.value).splitlines()
    assert lines[0] == f"{tmp_path / 'run'}: --resume cannot change what the step-1 checkpoint fixes (recorded in recipe.yaml):"
    assert lines[1].startswith(f'  model.path: "{random_tiny_model[0]}" -> "urlvr/tiny" (the checkpoint holds the weights')
    assert lines[2].startswith("  optim.lr: ") and "-> 0.5 (the checkpoint restores the optimizer" in lines[2]
    assert not (tmp_path / "run" / "recipe.resume-1.yaml").exists()
    more = {**recipe, "rollout": {**recipe["rollout"], "group_size": 2}, "trainer": {**recipe["trainer"], "total_steps": 2}}
    assert [m["step"] for m in urlvr.train(more, resume=tmp_path / "run").metrics] == [2]
    assert (tmp_path / "run" / "recipe.resume-1.yaml").is_file()


def test_refuses_to_overwrite_a_run(random_tiny_model, tmp_path):
    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"total_steps": 1})
    urlvr.train(recipe)
    with pytest.raises(urlvr.RecipeError, match="already holds a run; pass --resume"):
        urlvr.train(recipe)


def test_final_model_is_hf_loadable_and_trained(random_tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = urlvr.train(recipe_for(random_tiny_model, tmp_path / "run"))
    model = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    AutoTokenizer.from_pretrained(result.final_model_dir)
    initial = random_tiny_model[1].state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "training did not change any weight"


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_last_checkpoint_valid(random_tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    recipe = recipe_for(random_tiny_model, run_dir, trainer={"total_steps": 200, "save_every": 1, "keep_last": 2})
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    # a fresh world of one: drop the rendezvous variables this test process set for itself
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    log = open(tmp_path / "child.log", "w")
    code = ("import json,sys,urlvr; urlvr.train(json.load(open(sys.argv[1])))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(recipe_path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    killed_mid_write = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            root = run_dir / "checkpoints"
            tmp_dirs = list(root.glob(".tmp-step-*")) if root.is_dir() else []
            if tmp_dirs and len(complete_checkpoints(run_dir)) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_write = True
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log.close()
    assert killed_mid_write, (tmp_path / "child.log").read_text()[-3000:]
    latest = latest_checkpoint(run_dir)
    assert latest is not None and (latest / "COMPLETE").is_file()
    saved_step = json.loads((latest / "trainer_state.json").read_text())["step"]
    resumed = urlvr.train({**recipe, "trainer": {**recipe["trainer"], "total_steps": saved_step + 1}}, resume=run_dir)
    assert [m["step"] for m in resumed.metrics] == [saved_step + 1]
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))  # the half-written one was swept


def test_evaluation_before_during_and_after(random_tiny_model, tmp_path):
    source = {"kind": "arithmetic", "num_problems": 3, "seed": 99}
    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"total_steps": 2},
                        eval={"at_start": True, "every_steps": 1, "at_end": True, "source": source,
                              "samples_per_prompt": 2, "max_new_tokens": 6})
    result = urlvr.train(recipe)
    assert [e["step"] for e in result.evaluations] == [0, 1, 2]  # at_end does not repeat step 2
    assert all(e["eval/prompts"] == 3.0 and 0.0 <= e["eval/avg@2"] <= e["eval/pass@2"] <= 1.0 for e in result.evaluations)
    lines = (result.run_dir / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert all("eval/avg@2" not in m for m in result.metrics)  # metrics.jsonl keys stay stable


def test_pass_at_k_unbiased_estimator():
    from math import comb

    from urlvr.metrics.evaluation import pass_at_k

    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert abs(pass_at_k(5, 2, 2) - (1 - comb(3, 2) / comb(5, 2))) < 1e-15  # = 0.7
    assert abs(pass_at_k(8, 2, 1) - 0.25) < 1e-15


def test_wandb_offline_run_records_the_metrics(random_tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"total_steps": 1},
                        logging={"console": False, "wandb": {"enabled": True, "project": "urlvr-test"}})
    result = urlvr.train(recipe)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "auto mode without a key must run offline"
    assert list(runs[0].glob("*.wandb")), "no offline wandb log written"


def test_tensorboard_event_file_holds_the_step_metrics(random_tiny_model, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"total_steps": 2},
                        logging={"console": False, "tensorboard": {"enabled": True}})
    result = urlvr.train(recipe)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("reward/proxy_mean", "reward/ground_truth_mean", "loss/policy"):
        assert key in tags
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(m["step"], m[key]) for m in result.metrics]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 on disk


@pytest.fixture(scope="module")
def zero0_run(random_tiny_model, tmp_path_factory):
    return urlvr.train(recipe_for(random_tiny_model, tmp_path_factory.mktemp("zero0") / "run"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_zero0(stage, zero0_run, random_tiny_model, tmp_path):
    """One process, ZeRO-1/2/3 vs plain DeepSpeed (ZeRO-0): same metrics, same final weights
    (the two-process versions of stages 2 and 3 are in test_distributed.py)."""
    result = urlvr.train(recipe_for(random_tiny_model, tmp_path / "run", optim={"lr": 1e-3, "deepspeed": {"zero_stage": stage}}))
    want, got = stable(zero0_run.metrics), stable(result.metrics)
    assert [m.keys() for m in got] == [m.keys() for m in want]
    for a, b in zip(want, got):
        for key in a:
            if not key.startswith(("rollout/logprob_mismatch", "rollout/mismatch_kl")):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (stage, key)
    ref, new = load_file(zero0_run.final_model_dir / "model.safetensors"), load_file(result.final_model_dir / "model.safetensors")
    assert max(float((ref[k] - new[k]).abs().max()) for k in ref) < 1e-5
    initial = load_file(random_tiny_model[0] / "model.safetensors")
    assert max(float((initial[k] - new[k]).abs().max()) for k in initial) > 1e-3  # the weights did move


def test_a_run_folder_takes_one_run_at_a_time(tmp_path):
    """A second run (or a resume) into a folder a live run is writing is refused, naming the pid
    that holds it (the lock goes with the process, so a killed run leaves none behind)."""
    from urlvr.recipe import RecipeError
    from urlvr.trainer.checkpoint import lock_run_dir

    held = lock_run_dir(tmp_path / "run")
    for _ in range(2):  # a refused attempt keeps the holder's pid for the next one
        with pytest.raises(RecipeError, match=rf"another urlvr process \(pid {os.getpid()}\) is running in this folder"):
            lock_run_dir(tmp_path / "run")
    held.close()  # what the kernel does when the process ends
    lock_run_dir(tmp_path / "run").close()


def test_a_finished_run_frees_its_folder_while_the_trainer_lives(random_tiny_model, tmp_path):
    """The lock ends with `fit`, not with garbage collection (a notebook or `urlvr mcs` holding the
    Trainer kept the folder locked, and an unclosed-file ResourceWarning followed every run)."""
    from urlvr.trainer.checkpoint import lock_run_dir
    from urlvr.trainer.run import Trainer

    trainer = Trainer(recipe_for(random_tiny_model, tmp_path / "run"))
    trainer.fit()
    lock_run_dir(tmp_path / "run").close()  # refused while `trainer` is alive before


def test_resuming_a_finished_run_changes_nothing(random_tiny_model, tmp_path, capsys, monkeypatch):
    recipe = recipe_for(random_tiny_model, tmp_path / "run")
    urlvr.train(recipe)
    def files() -> dict[str, int]:  # the lock file is the one the resume opens, and it holds nothing
        return {str(p): p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".urlvr.lock"}

    before = files()
    import urlvr.trainer.run as run_module

    def no_model(*_):  # a finished run is known from its checkpoint: no model loads, no generation server starts
        raise AssertionError("build_run called for a finished run")
    monkeypatch.setattr(run_module, "build_run", no_model)
    result = urlvr.train(recipe, resume=tmp_path / "run")
    assert result.metrics == []
    after = files()
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert "already at step 2 of 2: nothing to train" in capsys.readouterr().err


def test_a_run_whose_responses_reach_the_context_caps_them_and_says_so(random_tiny_model, tmp_path, capsys):
    """The model's context (config.max_position_embeddings) 4 tokens after the longest prompt (31
    and 32 tokens), max_new_tokens 12: every response stops at the context, with reason `length`
    unless it ended there; the run prints one note at start-up; a prompt that fills the context is
    refused before step 1 (the engines would refuse it at its first step)."""
    from urlvr.data.records import DataError
    from urlvr.data.templates import encode_prompts
    from urlvr.recipe import load_recipe

    _, model, tokenizer = random_tiny_model
    recipe = load_recipe(recipe_for(random_tiny_model, tmp_path / "run"))
    lengths = [len(p.token_ids) for p in encode_prompts(tokenizer, recipe.data.source.load(),
                                                        template=recipe.data.template, max_prompt_length=100).inputs]
    small = tmp_path / "small-context"
    model.save_pretrained(small)
    tokenizer.save_pretrained(small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": max(lengths) + 4}))

    result = urlvr.train(recipe_for((small,), tmp_path / "run", trainer={"total_steps": 1}))
    assert (f"urlvr: note: {len(lengths)} of {len(lengths)} prompts leave fewer than rollout.max_new_tokens=12 "
            f"tokens before the model's context length ({max(lengths) + 4}, config.max_position_embeddings); their "
            "responses are cut there, with finish reason `length`") in capsys.readouterr().out
    assert result.metrics[0]["response/length_max"] <= max(lengths) + 4 - min(lengths) < 12
    assert result.metrics[0]["response/truncation_rate"] > 0.5  # the random model rarely picks eos

    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": max(lengths)}))
    with pytest.raises(DataError, match="which fill the model's context length of"):
        urlvr.train(recipe_for((small,), tmp_path / "run2", trainer={"total_steps": 1}))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_export_keeps_tied_embeddings_one_weight(random_tiny_model, tmp_path, lora):
    """SmolLM2 and Gemma tie lm_head to the embeddings: the export saves the matrix once (as the
    source folder does) and a reload ties it again, equal to the trained embeddings."""
    from transformers import AutoModelForCausalLM

    path, model, tokenizer = random_tiny_model
    tied = tmp_path / "tied"
    config = model.config.to_dict() | {"tie_word_embeddings": True}
    source = type(model)(type(model.config).from_dict(config))
    source.save_pretrained(tied)
    tokenizer.save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    extra = {"model": {"path": str(tied), "lora": {"rank": 4, "alpha": 8, "export_merged": True}}} if lora else {}
    result = urlvr.train(small_run_recipe(tied, tmp_path / "run", trainer={"total_steps": 1}, **extra))
    out = result.final_model_dir / "merged" if lora else result.final_model_dir
    saved = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(reloaded.get_input_embeddings().weight, saved["model.embed_tokens.weight"])


def test_a_run_stopped_before_its_first_checkpoint_says_to_delete_its_folder(random_tiny_model, tmp_path):
    """Stopped before trainer.save_every's first checkpoint: `train` and `train --resume` each
    pointed at the other (a breaker's dead end); both now say to delete the folder."""
    recipe = recipe_for(random_tiny_model, tmp_path / "run", trainer={"total_steps": 1})
    urlvr.train(recipe)
    for path in (tmp_path / "run" / "checkpoints").iterdir():  # as if it had stopped before saving one
        shutil.rmtree(path)
    for resume in (None, tmp_path / "run"):
        with pytest.raises(urlvr.RecipeError, match="delete the folder to start over"):
            urlvr.train(recipe, resume=resume)
