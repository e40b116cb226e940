"""The command line: one-line errors with file and field, schema, validate, rewards."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import small_run_recipe
from urlvr.cli import main
from urlvr.registry import catalog
from urlvr.rewards.base import REWARDS


def test_validate_bad_recipe_prints_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"reward": {"terms": [{"name": "majorty_vote"}]}}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"urlvr: error: {path}: reward.terms.0: unknown reward 'majorty_vote'; did you mean 'majority_vote'?")
    assert "Traceback" not in err


def test_validate_prints_resolved_recipe_with_overrides(tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"total_steps": 3}}))
    assert main(["validate", str(path), "--set", "rollout.group_size=4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"]["total_steps"] == 3 and resolved["rollout"]["group_size"] == 4
    assert resolved["optim"]["lr"] == 1e-6


def test_train_missing_recipe_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"urlvr: error: {tmp_path / 'none.yaml'}: recipe file not found"


def test_schema_is_json_with_sections(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "data", "rollout", "reward", "algorithm", "optim", "trainer", "logging", "eval"} <= set(schema["properties"])


def test_rewards_lists_builtins(capsys):
    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    assert "majority_vote" in out and "ground_truth" in out and "[oracle]" in out


def test_rewards_of_a_name_registered_as_another_kind_points_there(capsys):
    """`urlvr rewards restrain`: restrain sits beside the rewards in docs/rewards.md, but it is an
    advantage shaper; the error says where it is instead of listing every reward."""
    assert main(["rewards", "restrain"]) == 2
    assert capsys.readouterr().err.strip() == ("urlvr: error: 'restrain' is not a reward: it is an entry of "
                                               "advantage_shaper (urlvr list advantage_shaper)")
    assert main(["rewards", "majorty_vote"]) == 2
    assert "did you mean 'majority_vote'" in capsys.readouterr().err


def test_probe_refuses_a_prompt_count_below_one(capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["probe", "urlvr/tiny", "--prompts", "0"])
    assert err.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("make, problem", [
    (lambda tmp: tmp / "missing", "no such folder"),
    (lambda tmp: tmp, "the folder has no config.json"),
    (lambda tmp: (tmp / "recipe.yaml").write_text("{}") and tmp / "recipe.yaml", "is a file, not a model folder"),
])
def test_a_model_path_that_cannot_load_is_one_line(tmp_path, make, problem):
    from conftest import small_run_recipe

    import urlvr
    from urlvr.recipe import RecipeError

    recipe = small_run_recipe(make(tmp_path), tmp_path / "run")
    with pytest.raises(RecipeError, match=rf"model.path '.*': {problem}"):
        urlvr.train(recipe)


def test_a_stop_token_outside_the_vocabulary_is_refused(random_tiny_model, tmp_path):
    from conftest import small_run_recipe

    import urlvr
    from urlvr.recipe import RecipeError

    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", rollout={"stop_token_ids": [3, 10**6, -1]})
    with pytest.raises(RecipeError, match=r"rollout.stop_token_ids: \[1000000, -1\] outside the model's vocabulary"):
        urlvr.train(recipe)


def test_mcs_refuses_an_earlier_mcs_folder_in_one_line(tmp_path, capsys):
    """Before anything trains: the earlier tables would be overwritten and its run directories
    left beside the new ones (`--overwrite` deletes them; tests/test_mcs.py runs that)."""
    (tmp_path / "mcs.csv").write_text("rank,model\n")
    assert main(["mcs", "urlvr/tiny", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"urlvr: error: {tmp_path}: holds the output of an earlier `urlvr mcs` "
                                               "(mcs.csv); pass --overwrite to replace it, or --out a new folder")


# --------------------------------------------------------------------------- urlvr list
def test_list_prints_every_registry_with_each_entry_and_its_summary(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for key, found in catalog().items():
        assert f"\n{key} ({len(found.names())}):\n" in f"\n{out}", key
        for name in found.names():
            assert f"\n  {name} " in out or f"\n  {name}\n" in out, (key, name)
    # a section's docstring gives its first sentence, an entry's `description` itself (a plugin a
    # test imported may widen the name column)
    assert re.search(r"^  ppo_clip +PPO's clipped surrogate .* optional dual clip; logs", out, re.M)
    assert re.search(r"^  entropy_collapse +actor entropy falls below threshold x its starting value$", out, re.M)


def test_list_one_kind_by_a_word_of_it_plural_or_not(capsys):
    assert main(["list", "rewards"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"reward ({len(REWARDS.names())}):\n")
    width = max(len(name) for name in REWARDS.names())
    for name in REWARDS.names():
        assert f"  {name:{width}s}  {REWARDS.get(name).description}".rstrip() in out.splitlines()
    assert main(["list", "losses"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")]
    counts = {key: len(catalog()[key].names()) for key in ("loss_aggregation", "policy_loss")}  # plugins included
    assert headers == [f"{key} ({n}):" for key, n in counts.items()]
    assert main(["list", "policy-loss"]) == 0
    assert capsys.readouterr().out.startswith(f"policy_loss ({counts['policy_loss']}):\n")


def test_list_an_unknown_kind_is_one_line_naming_the_kinds(capsys):
    assert main(["list", "engins"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("urlvr: error: no registry of 'engins'; did you mean 'engines'?")
    assert f"(kinds: {', '.join(sorted(catalog()))})" in err


def test_train_refuses_a_plugin_engine_missing_a_protocol_method_before_any_model_load(tmp_path, capsys, monkeypatch):
    """Before the engine was checked against its protocol at registration, an engine without `offload`
    loaded the model, sampled, and failed with an AttributeError at the first update."""
    (tmp_path / "engine_without_offload.py").write_text(
        "from typing import Literal\n"
        "from urlvr.rollout.base import ROLLOUT_ENGINES\n"
        "from urlvr.rollout.transformers_engine import TransformersEngineSection, TransformersRolloutEngine\n\n"
        "class NoOffloadSection(TransformersEngineSection):\n"
        "    name: Literal['no_offload'] = 'no_offload'\n\n"
        "@ROLLOUT_ENGINES.register('no_offload')\n"
        "class NoOffload:\n"
        "    settings = NoOffloadSection\n"
        "    uses_trainer_module = True\n\n"
        "    @classmethod\n"
        "    def from_recipe(cls, recipe, model, tokenizer, dist):\n"
        "        return cls()\n\n"
        "    def generate(self, prompts, group_size, sampling):\n"
        "        raise AssertionError('sampled')\n\n"
        "    def sync_weights(self, model):\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("urlvr.trainer.build.load_model_and_tokenizer", _no_model_load)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"plugins": ["engine_without_offload"], "rollout": {"engine": "no_offload"},
                                    "output_dir": str(tmp_path / "run"), "trainer": {"total_steps": 1}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"urlvr: error: {path}: plugins.0: cannot import 'engine_without_offload': TypeError: rollout engine "
                   "'no_offload' (engine_without_offload.NoOffload) has no method 'offload' of the RolloutEngine "
                   "protocol (it needs: settings, uses_trainer_module, from_recipe, generate, sync_weights, offload; "
                   "docs/writing-engines.md)")


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the engine was checked")


def test_list_gives_every_built_in_part_a_summary():
    # the built-in data sources had no docstring: `urlvr list` showed their names alone
    from urlvr.commands.listing import summary

    bare = [f"{key}.{name}" for key, reg in catalog().items() for name in reg.names()
            if _defined_in_urlvr(reg.get(name)) and not summary(reg.get(name))]
    assert bare == []


def _defined_in_urlvr(entry) -> bool:
    """Registered by urlvr itself, not by a plugin an earlier test imported (a reward's spec is
    urlvr's class, its function the plugin's)."""
    return getattr(getattr(entry, "fn", entry), "__module__", "").startswith("urlvr.")


def _fresh_process_env() -> dict[str, str]:
    """This environment without the process-group variables an in-process run of this session set
    (init_distributed's RANK, MASTER_PORT, ...): a child must start its own world of one, not
    join (or collide with) this process's."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    return {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1"}


def test_sigterm_ends_a_train_like_ctrl_c(random_tiny_model, tmp_path):
    """`kill`, `timeout` or a scheduler's preemption (SIGTERM) ends a single-process run the way
    Ctrl-C does: cleanup runs (trackers closed, a generation server stopped) and one line says how
    to resume, exit 143. The default action killed it at once: exit -15, no line, wandb's run
    marked crashed."""
    out = tmp_path / "run"
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump(small_run_recipe(random_tiny_model[0], out, trainer={"total_steps": 100_000})))
    run = subprocess.Popen([sys.executable, "-m", "urlvr.cli", "train", str(recipe)], env=_fresh_process_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():  # training
            assert run.poll() is None, run.stderr.read()[-3000:]
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 143, err[-3000:]
    assert "urlvr: terminated (SIGTERM); the last complete checkpoint is intact" in err
    assert "Traceback" not in err


def test_the_urlvr_command_ends_its_process_group_before_the_interpreter(random_tiny_model, tmp_path):
    """After a successful `urlvr train` the command destroys the process group itself. Left to
    interpreter exit, gloo's threads were torn down with the C++ statics and could abort a run
    that had finished ("terminate called without an active exception", exit -6: the deepspeed
    launcher then reported the run as failed; pytorch/pytorch #190489)."""
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(small_run_recipe(random_tiny_model[0], tmp_path / "run")))
    script = ("import atexit, sys, torch; from urlvr.cli import run; "
              "atexit.register(lambda: print('group alive at exit:', torch.distributed.is_initialized())); "
              "sys.argv = ['urlvr', 'train', sys.argv[1]]; run()")
    done = subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True, timeout=600,
                          env=_fresh_process_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "group alive at exit: False" in done.stdout
