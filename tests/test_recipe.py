"""Recipe validation: defaults = Table 7, and every error names the file and the field path."""

import re
from pathlib import Path

import pytest
import yaml

from urlvr.recipe import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict, overrides=()) -> str:
    path = write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value).replace(str(path), "recipe.yaml")


def test_defaults_are_the_papers_table_7():
    recipe = Recipe()
    assert recipe.algorithm.advantage == "grpo"
    assert recipe.rollout.temperature == 1.0
    assert recipe.trainer.prompts_per_step == 64
    assert recipe.trainer.prompts_per_minibatch == 64  # pure on-policy
    assert recipe.rollout.group_size == 8
    assert recipe.algorithm.kl_coef == 0.0 and recipe.algorithm.entropy_coef == 0.0
    assert recipe.data.max_prompt_length == 1024 and recipe.rollout.max_new_tokens == 7168
    assert recipe.optim.lr == 1e-6
    assert recipe.trainer.ppo_epochs == 1


def test_unknown_key_suggests_the_closest(tmp_path):
    message = error_of(tmp_path, {"trainer": {"prompts_per_stepp": 8}})
    assert message.startswith("recipe.yaml: trainer.prompts_per_stepp: unknown field 'prompts_per_stepp'; "
                              "did you mean 'prompts_per_step'?")


def test_unknown_section(tmp_path):
    message = error_of(tmp_path, {"optimizer": {}})
    assert message.startswith("recipe.yaml: optimizer: unknown field 'optimizer'; did you mean 'optim'? (known: ")


def test_bad_type(tmp_path):
    message = error_of(tmp_path, {"rollout": {"group_size": "eight"}})
    assert message == ("recipe.yaml: rollout.group_size: Input should be a valid integer, "
                       "unable to parse string as an integer (got 'eight')")


def test_unknown_reward_name(tmp_path):
    message = error_of(tmp_path, {"reward": {"terms": [{"name": "majorty_vote"}]}})
    assert message.startswith("recipe.yaml: reward.terms.0: unknown reward 'majorty_vote'; "
                              "did you mean 'majority_vote'? (known: ")
    # capitals are a typo like any other (difflib alone found nothing for `MAJORITY_VOTE`)
    message = error_of(tmp_path, {"reward": {"terms": [{"name": "MAJORITY_VOTE"}]}})
    assert "unknown reward 'MAJORITY_VOTE'; did you mean 'majority_vote'?" in message


def test_reward_kwargs_checked_against_signature(tmp_path):
    message = error_of(tmp_path, {"reward": {"terms": [{"name": "majority_vote", "kwargs": {"tie": "first"}}]}})
    assert message == ("recipe.yaml: reward.terms.0: reward 'majority_vote' takes no argument 'tie' "
                       "(it takes: ties, no_answer, min_majority_ratio); did you mean 'ties'?")
    message = error_of(tmp_path, {"reward": {"extractor": "regex", "extractor_kwargs": {"patern": "(\\d+)"}}})
    assert "extractor 'regex' takes no argument 'patern' (it takes: pattern" in message
    assert message.endswith("did you mean 'pattern'?")


def test_out_of_range(tmp_path):
    message = error_of(tmp_path, {"rollout": {"temperature": 0}})
    assert message == "recipe.yaml: rollout.temperature: Input should be greater than 0 (got 0)"


def test_missing_data_file(tmp_path):
    message = error_of(tmp_path, {"data": {"source": {"kind": "file", "path": "nowhere.jsonl"}}})
    assert message == "recipe.yaml: data.source.file.path: file not found: nowhere.jsonl"


def test_unknown_field_inside_a_union_variant(tmp_path):
    message = error_of(tmp_path, {"data": {"source": {"kind": "arithmetic", "num_problem": 3}}})
    assert message.startswith("recipe.yaml: data.source.arithmetic.num_problem: unknown field 'num_problem'; "
                              "did you mean 'num_problems'?")


def test_unknown_loss_and_advantage(tmp_path):
    message = error_of(tmp_path, {"algorithm": {"advantage": "grpoo", "loss_aggregation": "token_mean"}})
    lines = message.splitlines()
    assert lines[0].startswith("recipe.yaml: algorithm.advantage: unknown advantage estimator 'grpoo'; did you mean 'grpo'?")
    assert lines[1].startswith("recipe.yaml: algorithm.loss_aggregation: unknown loss aggregation 'token_mean'; "
                               "did you mean 'token-mean'?")


def test_engine_is_a_variant_with_its_own_section(tmp_path):
    assert Recipe().rollout.engine.name == "transformers" and Recipe().rollout.engine.generation_batch_size == 64
    recipe = load_recipe(write(tmp_path, {"rollout": {"engine": {"name": "vllm", "sync_bucket_mb": 1}}}),
                         ["rollout.engine.enforce_eager=true"])
    assert (recipe.rollout.engine.name, recipe.rollout.engine.sync_bucket_mb, recipe.rollout.engine.enforce_eager) == ("vllm", 1, True)
    by_name = load_recipe(write(tmp_path, {"rollout": {"engine": "transformers"}}), ["rollout.engine.generation_batch_size=3"])
    assert by_name.rollout.engine.generation_batch_size == 3
    assert Recipe.model_validate(recipe.model_dump(mode="json")) == recipe  # the engine's knobs round-trip


def test_unknown_engine_name_fails_at_load_with_a_suggestion(tmp_path):
    # (known: ...) also lists engines that plugins registered earlier in this process (docs examples)
    assert error_of(tmp_path, {"rollout": {"engine": "vlm"}}).startswith(
        "recipe.yaml: rollout.engine: unknown rollout engine 'vlm'; did you mean 'vllm'? (known: ")
    assert error_of(tmp_path, {"rollout": {"engine": {"name": "transformer", "generation_batch_size": 8}}}).startswith(
        "recipe.yaml: rollout.engine: unknown rollout engine 'transformer'; did you mean 'transformers'?")


def test_unknown_engine_knob_names_the_known_ones(tmp_path):
    assert error_of(tmp_path, {"rollout": {"engine": {"name": "vllm", "sync_bucket": 1}}}) == (
        "recipe.yaml: rollout.engine.sync_bucket: unknown field 'sync_bucket'; did you mean 'sync_bucket_mb'? "
        "(known: cpu_kv_cache_gib, enable_prefix_caching, enforce_eager, gpu_memory_utilization, kwargs, "
        "max_model_len, max_num_batched_tokens, name, sleep, sync_bucket_mb)")
    # a knob of another engine: the transformers engine's section has no vLLM knobs
    assert error_of(tmp_path, {"rollout": {"engine": "transformers"}}, ["rollout.engine.sync_bucket_mb=8"]) == (
        "recipe.yaml: rollout.engine.sync_bucket_mb: unknown field 'sync_bucket_mb' (known: generation_batch_size, name) "
        "(from --set rollout.engine.sync_bucket_mb=8)")


@pytest.mark.parametrize(("rollout", "where"), [
    ({"generation_batch_size": 8}, "`engine: {name: transformers, generation_batch_size: 8}`"),
    ({"engine": "vllm", "vllm": {"sync_bucket_mb": 1}}, "`engine: {name: vllm, sync_bucket_mb: 1}`"),
])
def test_moved_engine_keys_say_where_they_went(tmp_path, rollout, where):
    message = error_of(tmp_path, {"rollout": rollout})
    assert len(message.splitlines()) == 1
    assert message.startswith(f"recipe.yaml: rollout: {next(iter(k for k in rollout if k != 'engine'))} moved into "
                              f"the engine's own section: write {where}")


def test_minibatch_must_divide_step(tmp_path):
    message = error_of(tmp_path, {"trainer": {"prompts_per_step": 10, "prompts_per_minibatch": 4}})
    assert message == ("recipe.yaml: trainer: prompts_per_step (10) must be a multiple of "
                       "prompts_per_minibatch (4)")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nothere.yaml: recipe file not found"):
        load_recipe(tmp_path / "nothere.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("trainer:\n  total_steps: [1\n")
    with pytest.raises(RecipeError, match=r"r.yaml: line \d+ not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize("text, line, key, first", [
    ("optim:\n  lr: 1.0e-4\n  lr: 3.0e-5\n", 3, "lr", 2),  # the second value would win silently
    ("trainer: {total_steps: 2}\nseed: 1\ntrainer: {save_every: 0}\n", 3, "trainer", 1),  # a whole section lost
])
def test_a_repeated_key_is_refused_not_dropped(tmp_path, text, line, key, first):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=rf"r.yaml: line {line} .*key '{key}' appears twice \(first on line {first}"):
        load_recipe(path)


@pytest.mark.parametrize("text, problem", [
    ("", "empty recipe file (a recipe is a mapping; write {} for all defaults)"),
    ("# only a comment\n", "empty recipe file (a recipe is a mapping; write {} for all defaults)"),
    ("null\n", "empty recipe file (a recipe is a mapping; write {} for all defaults)"),
    ("trainer\n", "a recipe must be a mapping of sections, got a string"),
    ("3\n", "a recipe must be a mapping of sections, got a number"),
    ("false\n", "a recipe must be a mapping of sections, got a boolean"),
    ("[]\n", "a recipe must be a mapping of sections, got a list"),
    ("- trainer: {total_steps: 3}\n", "a recipe must be a mapping of sections, got a list"),
])
def test_a_recipe_that_is_not_a_mapping_is_one_line_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: {problem}"


def test_an_explicit_empty_mapping_is_an_all_defaults_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("{}\n")
    assert load_recipe(path) == Recipe()


@pytest.mark.parametrize("override, message", [
    ("trainer=", "recipe.yaml: --set 'trainer=': no value after '=' (write trainer=null for null)"),
    ("trainer.total_steps= ", "recipe.yaml: --set 'trainer.total_steps= ': no value after '=' (write trainer.total_steps=null for null)"),
    ("trainer=null", "recipe.yaml: trainer: Input should be a valid dictionary or instance of TrainerSection (got None) "
                     "(from --set trainer=null)"),
    ("trainer.total_steps=true", "recipe.yaml: trainer: total_steps: expected a number, got true"),
    ("optim.betas=[false, 0.99]", "recipe.yaml: optim: betas: expected a number, got false (item 0)"),
    ("rollout.stop_token_ids=[3, true]", "recipe.yaml: rollout: stop_token_ids: expected a number, got true (item 1)"),
    ("trainer=3", "recipe.yaml: trainer: Input should be a valid dictionary or instance of TrainerSection (got 3) "
                  "(from --set trainer=3)"),
    ("trainer=[1]", "recipe.yaml: trainer: Input should be a valid dictionary or instance of TrainerSection (got [1]) "
                    "(from --set trainer=[1])"),
    ("trainer.total_steps.x=1", "recipe.yaml: --set 'trainer.total_steps.x=1': 'total_steps' is not a section"),
])
def test_an_override_that_empties_or_replaces_a_section_names_it(tmp_path, override, message):
    assert error_of(tmp_path, {"trainer": {"total_steps": 3}}, [override]) == message


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, {"trainer": {"total_steps": 3}})
    recipe = load_recipe(path, ["trainer.total_steps=7", "rollout.stop_token_ids=[1, 2]", "eval.max_new_tokens=null",
                                "algorithm.loss.dual_clip_c=3", "trainer.ppo_epochs=2"])  # a clip needs a ratio off 1
    assert recipe.trainer.total_steps == 7
    assert recipe.rollout.stop_token_ids == [1, 2]
    assert recipe.algorithm.loss.dual_clip_c == 3.0


def test_overrides_address_list_items_by_index(tmp_path):
    """`--set reward.terms.0.weight=0.5` reaches into the recipe's list (it was refused: 'terms' is
    not a section); the item keeps its other fields."""
    path = write(tmp_path, {"reward": {"terms": [{"name": "majority_vote", "weight": 1.0},
                                                 {"name": "self_certainty", "kwargs": {}}]}})
    recipe = load_recipe(path, ["reward.terms.0.weight=0.5", "reward.terms.1.weight=2"])
    assert [(t.name, t.weight) for t in recipe.reward.terms] == [("majority_vote", 0.5), ("self_certainty", 2.0)]
    assert load_recipe(path, ["reward.terms.1={name: token_entropy}"]).reward.terms[1].name == "token_entropy"


@pytest.mark.parametrize(("override", "message"), [
    ("reward.terms.2.weight=1", "recipe.yaml: --set 'reward.terms.2.weight=1': index 2 outside reward.terms, "
                                "a list of 2 items (indices 0..1)"),
    ("reward.terms.-1.weight=1", "recipe.yaml: --set 'reward.terms.-1.weight=1': index -1 outside reward.terms, "
                                 "a list of 2 items (indices 0..1)"),
    ("reward.terms.weight=1", "recipe.yaml: --set 'reward.terms.weight=1': reward.terms is a list; address an "
                              "item by its index (0..1), not 'weight'"),
    ("rollout.stop_token_ids.0=3", "recipe.yaml: --set 'rollout.stop_token_ids.0=3': rollout.stop_token_ids is "
                                   "not written in the recipe, so it has no items to index; set the whole list "
                                   "(rollout.stop_token_ids=[...]) instead"),
    ("reward.terms.0.weigth=1", "recipe.yaml: reward.terms.0.weigth: unknown field 'weigth'; did you mean 'weight'? "
                                "(known: alias, gate, kwargs, name, on_error, weight) (from --set reward.terms.0.weigth=1)"),
])
def test_a_list_override_outside_the_list_is_one_line_naming_its_length(tmp_path, override, message):
    data = {"reward": {"terms": [{"name": "majority_vote"}, {"name": "self_certainty"}]}}
    assert error_of(tmp_path, data, [override]) == message


def test_bad_override_names_field(tmp_path):
    message = error_of(tmp_path, {}, ["trainer.ppo_epochs=0"])
    assert message == ("recipe.yaml: trainer.ppo_epochs: Input should be greater than or equal to 1 (got 0) "
                       "(from --set trainer.ppo_epochs=0)")
    # a problem of the file, beside an override elsewhere, is not credited to it
    assert error_of(tmp_path, {"trainer": {"ppo_epochs": 0}}, ["trainer.total_steps=3"]) == (
        "recipe.yaml: trainer.ppo_epochs: Input should be greater than or equal to 1 (got 0)")


def test_plugin_registers_a_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_plugin.py").write_text(
        "from urlvr.rewards.base import reward\n"
        "@reward('always_one_plugin')\n"
        "def always_one(group, ctx, *, value: float = 1.0):\n"
        "    return [value] * group.size\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe({"plugins": ["my_rewards_plugin"],
                          "reward": {"terms": [{"name": "always_one_plugin", "kwargs": {"value": 2.0}}]}})
    assert recipe.reward.terms[0].kwargs == {"value": 2.0}


def test_missing_plugin_is_one_line(tmp_path):
    message = error_of(tmp_path, {"plugins": ["no_such_module_xyz"]})
    assert message == ("recipe.yaml: plugins.0: cannot import 'no_such_module_xyz': ModuleNotFoundError: No module named "
                       "'no_such_module_xyz' (is the folder holding 'no_such_module_xyz' on PYTHONPATH? e.g. PYTHONPATH=. urlvr ...)")


@pytest.mark.parametrize("module", ["os", "json.decoder"])
def test_a_plugin_that_registers_nothing_is_refused(tmp_path, module):
    """A typo that happens to name an installed module must not pass silently."""
    message = error_of(tmp_path, {"plugins": [module]})
    assert message.startswith(f"recipe.yaml: plugins.0: importing '{module}' registered nothing")


def test_a_plugin_loaded_twice_still_counts_as_registering(tmp_path, monkeypatch):
    (tmp_path / "twice_plugin.py").write_text(
        "from urlvr.rewards.base import reward\n\n"
        "@reward('twice_plugin_reward')\n"
        "def twice(group, ctx):\n"
        "    return [0.0] * group.size\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):  # the second recipe finds the module imported: no new registration, still fine
        assert load_recipe({"plugins": ["twice_plugin"]}).plugins == ["twice_plugin"]


def test_a_group_of_one_is_refused_with_the_reason():
    with pytest.raises(RecipeError, match=r"rollout.group_size: a group of 1 sample gets advantage 0 .* trains nothing"):
        load_recipe({"rollout": {"group_size": 1}})


def test_a_union_fields_problems_are_one_line():
    """pydantic reports one problem per member of a union (`list[str] | 'all-linear'`); the user
    made one mistake, so it is one line, the members' complaints joined."""
    with pytest.raises(RecipeError) as caught:
        load_recipe({"model": {"lora": {"target_modules": [True]}}})
    assert str(caught.value) == ("<dict>: model.lora.target_modules: item 0: Input should be a valid string (got True); "
                                 "or Input should be 'all-linear' (got [True])")


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)


def test_schema_has_a_description_for_every_field():
    schema = Recipe.model_json_schema()
    missing = []
    for name, definition in schema["$defs"].items():
        for field, prop in definition.get("properties", {}).items():
            if field != "kind" and "description" not in prop:
                missing.append(f"{name}.{field}")
    assert not missing, missing


def test_docs_recipe_reference_is_current():
    # a fresh process: parts that other tests register in this one (plugins) are no part of urlvr's reference
    import subprocess
    import sys

    rendered = subprocess.run([sys.executable, "-m", "urlvr.recipe.reference"], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout
    assert (REPO / "docs" / "recipe.md").read_text() == rendered, "run: python -m urlvr.recipe.reference > docs/recipe.md"


@pytest.mark.parametrize(("recipe", "message"), [
    ({"algorithm": {"token_filter": {"name": "clip_cov", "cov_low": 5, "cov_high": 1}}},
     "algorithm.token_filter: Value error, cov_low (5.0) must not exceed cov_high (1.0)"),
    ({"rollout": {"dynamic_sampling": {"name": "agreement", "max_agreement": 0}}},
     "rollout.dynamic_sampling.max_agreement: Input should be greater than 0"),
])
def test_settings_that_select_nothing_are_refused(tmp_path, recipe, message):
    assert message.replace("Value error, ", "") in error_of(tmp_path, recipe)


def test_recipe_changes_name_each_leaf_old_to_new():
    from urlvr.recipe.changes import format_changes, recipe_changes

    old = {"seed": 0, "output_dir": "a", "optim": {"lr": 1e-6}, "model": {"lora": None},
           "reward": {"terms": [{"name": "majority_vote", "weight": 1.0}]}}
    new = {"seed": 0, "output_dir": "b", "optim": {"lr": 3e-5}, "model": {"lora": {"rank": 8}},
           "reward": {"terms": [{"name": "majority_vote", "weight": 0.5}]}, "mode": "train"}
    changes = recipe_changes(old, new)  # output_dir is ignored: a run folder may move
    assert format_changes(changes).splitlines() == [
        "  optim.lr: 1e-06 -> 3e-05", '  model.lora: null -> {"rank": 8}', "  reward.terms.0.weight: 1.0 -> 0.5",
        '  mode: (absent) -> "train"']
    assert [c.added for c in changes] == [False, False, False, True]
    assert recipe_changes(old, old) == []


# A recipe knob acts on every path it is accepted on; where a combination leaves it inert, the
# recipe is refused at load time in one line naming the combination (issue 19's audit).
ARITH = {"kind": "arithmetic", "num_problems": 8}
INERT_KNOBS = {
    "offload_at_stage_0": ({"optim": {"deepspeed": {"offload_optimizer": True}}},
                           "optim.deepspeed: offload_optimizer needs zero_stage 1, 2 or 3"),
    "override_of_grad_clip": ({"optim": {"deepspeed": {"zero_stage": 2, "config_overrides": {"gradient_clipping": 0.5}}}},
                              "config_overrides.gradient_clipping is set by optim.grad_clip"),
    "override_of_checkpointing": ({"optim": {"deepspeed": {"config_overrides": {"activation_checkpointing": {
                                      "partition_activations": True}}}}},
                                  "config_overrides.activation_checkpointing is set by model.gradient_checkpointing"),
    "override_of_zero_stage": ({"optim": {"deepspeed": {"config_overrides": {"zero_optimization": {"stage": 3}}}}},
                               "config_overrides.zero_optimization.stage is set by optim.deepspeed.zero_stage"),
    "lr_floor_without_decay": ({"optim": {"min_lr_ratio": 0.1}}, "optim: min_lr_ratio (0.1) is the floor of the cosine"),
    "epochs_beside_steps": ({"trainer": {"total_steps": 10, "data_epochs": 3}},
                            "trainer: data_epochs (3) counts the steps only when total_steps is null"),
    "bucketing_beside_budget": ({"trainer": {"max_tokens_per_micro_batch": 512, "bucket_by_length": True}},
                                "trainer: bucket_by_length is implied by max_tokens_per_micro_batch"),
    "rows_beside_budget": ({"trainer": {"max_tokens_per_micro_batch": 512, "micro_batch_size": 4}},
                           "trainer: micro_batch_size (4) is not used with max_tokens_per_micro_batch"),
    "kl_estimator_without_penalty": ({"algorithm": {"kl_estimator": "k2"}},
                                     "algorithm.kl_estimator k2 estimates the KL penalty, which is off"),
    "kl_metric_period_beside_penalty": ({"algorithm": {"kl_coef": 0.01}, "dynamics": {"kl_to_initial_every": 5}},
                                        "dynamics.kl_to_initial_every (5): with algorithm.kl_coef > 0"),
    "reference_on_cpu_beside_penalty": ({"algorithm": {"kl_coef": 0.01}, "dynamics": {"kl_reference_device": "cpu"}},
                                        "there is no such copy with algorithm.kl_coef > 0"),
    "reference_on_cpu_under_lora": ({"model": {"lora": {}},
                                     "dynamics": {"kl_to_initial_every": 5, "kl_reference_device": "cpu"}},
                                    "there is no such copy under model.lora"),
    "reference_on_cpu_without_kl": ({"dynamics": {"kl_reference_device": "cpu"}}, "there is no such copy when no KL"),
    "eps_without_std_dr_grpo": ({"algorithm": {"advantage": "dr_grpo", "advantage_eps": 1e-3}},
                                "advantage dr_grpo does not divide by it"),
    "eps_without_std_rloo": ({"algorithm": {"advantage": "rloo", "advantage_eps": 1e-3}},
                             "advantage rloo does not divide by it"),
    "ppo_clip_on_policy": ({"algorithm": {"loss": {"name": "ppo_clip", "clip_eps_high": 0.28}}},
                           "algorithm.loss.clip_eps_high acts on the importance ratio, which is exactly 1"),
    "dual_clip_on_policy": ({"algorithm": {"loss": {"name": "ppo_clip", "dual_clip_c": 3}}},
                            "algorithm.loss.dual_clip_c acts on the importance ratio"),
    "gspo_clip_on_policy": ({"algorithm": {"loss": {"name": "gspo", "clip_eps_low": 1e-3}}},
                            "algorithm.loss.clip_eps_low acts on the importance ratio"),
    "cispo_clip_on_policy": ({"algorithm": {"loss": {"name": "cispo", "clip_eps_low": 0.2}}},
                             "algorithm.loss.clip_eps_low acts on the importance ratio"),
    "raw_certainty_at_temperature_1": ({"reward": {"certainty_logits": "raw", "terms": [{"name": "self_certainty"}]}},
                                       "reward.certainty_logits raw equals scaled at rollout.temperature 1.0"),
    "raw_certainty_without_statistics": ({"reward": {"certainty_logits": "raw"}, "rollout": {"temperature": 0.7}},
                                         "no reward term reads any"),
    "merged_export_without_export": ({"model": {"lora": {"export_merged": True}}, "trainer": {"export_final_model": False}},
                                     "model.lora.export_merged: nothing is exported"),
    "eval_source_without_eval": ({"eval": {"source": ARITH}}, "eval.source is set but no evaluation runs"),
    "eval_samples_without_eval": ({"eval": {"samples_per_prompt": 4}}, "eval.samples_per_prompt is set but no evaluation"),
    "held_out_without_eval": ({"eval": {"held_out": {"more": ARITH}}}, "eval.held_out is set but no evaluation runs"),
    "wandb_project_without_wandb": ({"logging": {"wandb": {"project": "mine"}}},
                                    "logging.wandb: project is set but wandb is off"),
    "tensorboard_folder_without_tensorboard": ({"logging": {"tensorboard": {"log_dir": "tb"}}},
                                               "logging.tensorboard: log_dir is set but tensorboard is off"),
    "best_mode_without_metric": ({"collapse": {"best_mode": "min"}}, "collapse: best_mode min ranks best_metric, which is null"),
    "sample_seed_without_sample": ({"data": {"source": {"kind": "adapter", "dataset": "aime-2024", "sample_seed": 3}}},
                                   "data.source.adapter: sample_seed seeds the draw of sample_size rows, which is null"),
    "collapse_threshold_without_oracle": ({"reward": {"oracle": None}, "collapse": {"smoothing_window": 3}},
                                          "collapse.smoothing_window applies to the Model Collapse Step, which this "
                                          "recipe never measures (reward.oracle is null)"),
    "collapse_threshold_for_other_rewards": ({"reward": {"terms": [{"name": "format"}]},
                                              "collapse": {"reward_accuracy_threshold": 0.05}},
                                             "the training reward's family is other, neither a verdict nor a certainty"),
    "collapse_action_without_alarms": ({"reward": {"oracle": None}, "collapse": {"action": "stop", "detectors": []}},
                                       "collapse.action stop: nothing can raise an alarm"),
    "dynamic_sampling_without_refill": ({"trainer": {"total_steps": 5},
                                         "rollout": {"dynamic_sampling": {"name": "zero_variance", "max_rounds": 1}}},
                                        "rollout.dynamic_sampling: max_rounds 1 never refills"),
    "one_round_of_the_training_batch": ({"trainer": {"total_steps": 5, "prompts_per_step": 4, "prompts_per_minibatch": 4},
                                         "rollout": {"dynamic_sampling": {"name": "zero_variance", "max_rounds": 1,
                                                                          "prompts_per_round": 4}}},
                                        "max_rounds (1) x prompts_per_round (4) = trainer.prompts_per_step (4) never chooses"),
    "rounds_that_draw_exactly_a_step": ({"trainer": {"total_steps": 5, "prompts_per_step": 4, "prompts_per_minibatch": 4},
                                         "rollout": {"dynamic_sampling": {"name": "zero_variance", "max_rounds": 2,
                                                                          "prompts_per_round": 2}}},
                                        "never chooses: every drawn group trains, as with dynamic_sampling none: "
                                        "raise max_rounds to 3 or prompts_per_round to 3"),
    "vllm_kwarg_of_a_field": ({"rollout": {"engine": {"name": "vllm", "kwargs": {"gpu_memory_utilization": 0.5}}}},
                              "rollout.engine.kwargs: gpu_memory_utilization is set by rollout.engine.gpu_memory_utilization"),
    "gspo_under_token_mean": ({"algorithm": {"loss": "gspo", "loss_aggregation": "token-mean"}},
                              "algorithm: loss gspo is defined with loss_aggregation seq-mean-token-mean only; "
                              "loss_aggregation token-mean would train another objective"),
    "gspo_token_under_dr_grpo_norm": ({"algorithm": {"loss": "gspo_token", "loss_aggregation": "seq-mean-token-sum-norm"}},
                                      "loss gspo_token is defined with loss_aggregation seq-mean-token-mean only"),
    "cispo_under_seq_mean": ({"algorithm": {"loss": {"name": "cispo"}, "loss_aggregation": "seq-mean-token-mean"}},
                             "loss cispo is defined with loss_aggregation token-mean only"),
    "vllm_kwarg_urlvr_needs": ({"rollout": {"engine": {"name": "vllm", "kwargs": {"logprobs_mode": "raw_logprobs"}}}},
                               "rollout.engine.kwargs: logprobs_mode is urlvr's"),
}


@pytest.mark.parametrize("case", sorted(INERT_KNOBS))
def test_a_knob_that_would_do_nothing_is_refused_naming_the_combination(tmp_path, case):
    recipe, message = INERT_KNOBS[case]
    error = error_of(tmp_path, recipe)
    assert message in error and "\n" not in error, error


@pytest.mark.parametrize("recipe", [
    {"optim": {"deepspeed": {"offload_optimizer": True, "zero_stage": 1}}},
    {"optim": {"deepspeed": {"config_overrides": {"zero_optimization": {"reduce_bucket_size": 50000000}}}}},
    {"optim": {"min_lr_ratio": 0.1, "schedule": "cosine"}},
    {"trainer": {"data_epochs": 3}},
    {"trainer": {"bucket_by_length": True, "micro_batch_size": 4}},
    {"trainer": {"max_tokens_per_micro_batch": 512}},
    {"algorithm": {"kl_estimator": "k2", "kl_coef": 0.01}},
    {"dynamics": {"kl_to_initial_every": 5, "kl_reference_device": "cpu"}},
    {"algorithm": {"advantage": "grpo", "advantage_eps": 1e-3}},
    {"algorithm": {"loss": {"name": "ppo_clip", "clip_eps_high": 0.28}}, "trainer": {"prompts_per_minibatch": 32}},
    {"algorithm": {"loss": {"name": "ppo_clip", "clip_eps_high": 0.28}}, "trainer": {"ppo_epochs": 2}},
    {"algorithm": {"loss": {"name": "ppo_clip", "clip_eps_high": 0.28}}, "model": {"lora": {"dropout": 0.1}}},
    {"reward": {"certainty_logits": "raw", "terms": [{"name": "self_certainty"}]}, "rollout": {"temperature": 0.7}},
    {"model": {"lora": {"export_merged": True}}, "trainer": {"export_final_model": False}, "collapse": {"action": "stop"}},
    {"eval": {"source": ARITH, "samples_per_prompt": 4, "held_out": {"more": ARITH}, "at_end": True}},
    {"mode": "test_time", "eval": {"source": ARITH, "samples_per_prompt": 4}},
    {"logging": {"wandb": {"project": "mine", "enabled": True}, "tensorboard": {"log_dir": "tb", "enabled": True}}},
    {"collapse": {"best_mode": "min", "best_metric": "eval/maj@32"}},
    {"collapse": {"smoothing_window": 3, "action": "stop", "detectors": []}},
    {"reward": {"oracle": None}, "collapse": {"action": "stop"}},
    {"data": {"source": {"kind": "adapter", "dataset": "aime-2024", "sample_seed": 3, "sample_size": 10}}},
    {"rollout": {"engine": {"name": "vllm", "kwargs": {"swap_space": 1}}}},
    # one round larger than the training batch chooses its informative groups (DAPO's oversampling)
    {"trainer": {"total_steps": 5, "prompts_per_step": 4, "prompts_per_minibatch": 4},
     "rollout": {"dynamic_sampling": {"name": "zero_variance", "max_rounds": 1, "prompts_per_round": 12}}},
])
def test_the_same_knobs_load_where_they_act(recipe):
    load_recipe(recipe)


def test_a_resolved_recipe_reloads(tmp_path):
    """The checks read values, not which keys a file spelled out: the run folder's recipe.yaml
    (every field written) loads again, also for a recipe that switches knobs on where they act."""
    recipe = load_recipe({"optim": {"min_lr_ratio": 0.1, "schedule": "cosine"}, "trainer": {"ppo_epochs": 2},
                          "algorithm": {"loss": {"name": "ppo_clip", "clip_eps_high": 0.28}, "advantage": "rloo"}})
    assert load_recipe(yaml.safe_load(yaml.safe_dump(recipe.model_dump(mode="json")))) == recipe


def test_vllm_cpu_kv_cache_size_refused_where_it_does_nothing():
    from urlvr.rollout.vllm_engine import VLLMEngineSection, check_kv_cache_size

    sized = VLLMEngineSection(cpu_kv_cache_gib=4)
    check_kv_cache_size(sized, True, None)
    check_kv_cache_size(sized, True, "4")
    check_kv_cache_size(VLLMEngineSection(), False, None)  # the default: nothing asked
    with pytest.raises(RecipeError, match=r"^rollout.engine.cpu_kv_cache_gib sizes the KV cache of vLLM's CPU backend; "
                                          r"on an accelerator gpu_memory_utilization sizes it"):
        check_kv_cache_size(sized, False, None)
    with pytest.raises(RecipeError, match=r"cpu_kv_cache_gib \(4\) differs from VLLM_CPU_KVCACHE_SPACE=8"):
        check_kv_cache_size(sized, True, "8")


@pytest.mark.parametrize(("terms", "oracle", "message"), [
    ([{"name": "majority_vote", "alias": "ground_truth"}], "ground_truth",
     "reward term 'majority_vote' would be logged as reward/ground_truth_mean, which is the oracle's (ground_truth)"),
    ([{"name": "majority_vote", "alias": "proxy"}], None,
     "reward term 'majority_vote' would be logged as reward/proxy_mean, which is the summed proxy reward"),
    ([{"name": "ground_truth"}], "math_verify",
     "reward term 'ground_truth' would be logged as reward/ground_truth_mean, which is the oracle's (math_verify)"),
    ([{"name": "majority_vote", "alias": ""}], "ground_truth", "reward.terms.0.alias: String should have at least 1 character"),
])
def test_a_term_whose_metric_would_overwrite_the_runs_own_is_refused(terms, oracle, message):
    # before: one `reward/<name>_mean` overwrote the other in metrics.jsonl (an alias `ground_truth` replaced
    # the oracle's mean with the proxy term's), and an empty alias silently fell back to the reward's name
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe({"reward": {"terms": terms, "oracle": oracle}})


def test_the_oracles_own_reward_as_a_term_keeps_its_name():
    # the supervised baseline: the same scores under the same name (recipes/paper/sweeps/rise-and-fall.yaml)
    assert load_recipe({"reward": {"terms": [{"name": "ground_truth"}]}}).reward.terms[0].metric_name == "ground_truth"
