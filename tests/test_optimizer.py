"""`optim.weight_decay_exclude`: which parameters AdamW decays (urlvr/trainer/optimizer.py), the
rule against HF Trainer's, one real step through the actor's DeepSpeed engine, and the refusals."""

from __future__ import annotations

import pytest
import torch

from urlvr.errors import RecipeError
from urlvr.recipe import load_recipe
from urlvr.recipe.sections.optimisation import OptimSection
from urlvr.trainer.optimizer import optimizer_param_groups


def tiny_models() -> dict:
    """Random 2-layer models of three families: Llama (RMSNorm, no biases: the embedded tiny
    model's), Qwen2 (RMSNorm, q/k/v biases) and GPT-2 (LayerNorm with biases, every linear biased)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**small)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**small)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=1, eos_token_id=1)),
    }


def spared_names(model: torch.nn.Module, groups: list[dict]) -> set[str]:
    spared = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return {name for name, p in model.named_parameters() if id(p) in spared}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_norms_and_biases_are_the_parameters_hf_trainer_spares(family):
    """The 1-D rule (nanoGPT's) picks exactly the parameters HF Trainer's name patterns exclude."""
    from transformers import Trainer

    model = tiny_models()[family]
    groups = optimizer_param_groups(model, OptimSection(weight_decay=0.1, weight_decay_exclude="norms_and_biases"))
    hf_decayed = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    names = {name for name, _ in model.named_parameters()}
    assert spared_names(model, groups) == names - hf_decayed
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each parameter once
    spared = spared_names(model, groups)
    assert any("norm" in n or ".ln_" in n for n in spared)
    assert any(n.endswith(".bias") for n in spared) == (family != "llama")
    assert not any("embed" in n or "wte" in n or "wpe" in n for n in spared)  # embeddings decay under both rules


def test_none_is_one_group_of_every_trained_parameter():
    model = tiny_models()["qwen2"]
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen parameter reaches no group
    groups = optimizer_param_groups(model, OptimSection(weight_decay=0.05))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert OptimSection().weight_decay_exclude == "none"  # veRL's, the paper's


def one_zero_gradient_step(model_dir, tmp_path, exclude: str, zero_stage: int):
    """The actor's engine takes one optimizer step with every gradient exactly 0 (lr 0.1, decay 0.2):
    AdamW's moment update is then 0 and only the decay moves a parameter, p <- p * (1 - lr * decay)."""
    from conftest import small_run_recipe
    from urlvr.dist import init_distributed
    from urlvr.trainer.actor import Actor
    from urlvr.trainer.build import load_model_and_tokenizer

    init_distributed()
    recipe = load_recipe(small_run_recipe(model_dir, tmp_path, optim={
        "lr": 0.1, "weight_decay": 0.2, "weight_decay_exclude": exclude, "deepspeed": {"zero_stage": zero_stage}}))
    model, _ = load_model_and_tokenizer(recipe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    actor = Actor(model, recipe, world_size=1, micro_steps_per_minibatch=1, total_optimizer_steps=1)
    loss = sum((p * 0).sum() for p in actor.scorer.parameters())  # a real graph, every gradient exactly 0
    actor.backward_and_step(loss, last_of_minibatch=True)
    return before, {name: p.detach().clone() for name, p in actor.model.named_parameters()}


@pytest.mark.parametrize("exclude, zero_stage", [("norms_and_biases", 0), ("norms_and_biases", 2), ("none", 0)])
def test_a_step_decays_exactly_the_chosen_parameters(exclude, zero_stage, tmp_path):
    """GPT-2 has biases and LayerNorms; ZeRO-2 flattens each group into its own partition."""
    from conftest import _char_tokenizer

    model = tiny_models()["gpt2"]
    with torch.no_grad():  # GPT-2 starts its biases at 0, where a decay cannot show: no zero anywhere
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)
    model.save_pretrained(tmp_path / "model")
    _char_tokenizer().save_pretrained(tmp_path / "model")
    before, after = one_zero_gradient_step(tmp_path / "model", tmp_path / "run", exclude, zero_stage)
    shrink = 1 - 0.1 * 0.2
    for name, old in before.items():
        spared = exclude == "norms_and_biases" and old.dim() < 2
        want = old if spared else old * shrink
        torch.testing.assert_close(after[name], want, rtol=1e-6, atol=0, msg=name)
        assert spared == torch.equal(after[name], old), name  # the decay really acted
    assert any(name.endswith(".bias") for name in before) and any(".ln_" in name for name in before)


@pytest.mark.parametrize("optim, extra, message", [
    ({"weight_decay": 0.0, "weight_decay_exclude": "norms_and_biases"}, {},
     "optim: weight_decay_exclude: norms_and_biases spares parameters from a weight decay of 0, which changes "
     "nothing: set weight_decay > 0 or weight_decay_exclude: none"),
    ({"weight_decay_exclude": "norms_and_biases"}, {"model": {"lora": {"rank": 4}}},
     "optim.weight_decay_exclude: norms_and_biases changes nothing under model.lora: only the adapters train, "
     "and they are all matrices (the frozen norms and biases never reach the optimizer); use "
     "weight_decay_exclude: none"),
    ({"weight_decay_exclude": "biases"}, {}, "optim.weight_decay_exclude: Input should be 'none' or 'norms_and_biases'"),
])
def test_an_exclusion_that_changes_nothing_is_refused(tmp_path, optim, extra, message):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"optim": optim, **extra}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value)


def test_weight_decay_zero_without_an_exclusion_still_loads(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim: {weight_decay: 0.0}\nmodel: {lora: {rank: 4}}\n")
    assert load_recipe(path).optim.weight_decay == 0.0


def test_a_resume_cannot_change_the_parameter_groups(tmp_path):
    """The checkpoint's optimizer state holds the old groups: a resume that changes
    `optim.weight_decay_exclude` is refused before anything loads, naming the field."""
    import yaml

    from urlvr.errors import RecipeError
    from urlvr.recipe import load_recipe
    from urlvr.trainer.resume import resume_changes

    old = load_recipe({"optim": {"weight_decay": 0.1}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old.model_dump(mode="json")))
    new = load_recipe({"optim": {"weight_decay": 0.1, "weight_decay_exclude": "norms_and_biases"}})
    with pytest.raises(RecipeError, match="optim.weight_decay_exclude.*parameter groups"):
        resume_changes(tmp_path, new, 1)
