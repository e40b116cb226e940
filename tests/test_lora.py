"""LoRA (`model.lora`, through peft): what trains, the adapters-off reference, merged weight sync,
checkpoints, resume and the exports. The vLLM sync of a LoRA run is in tests/test_vllm.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import urlvr
from conftest import small_run_recipe
from urlvr.dist import init_distributed
from urlvr.recipe import load_recipe
from urlvr.trainer import build

LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
REWARD = {"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"}
VOLATILE = ("time/", "perf/tokens_per_second")


def lora_recipe(random_tiny_model, out, lora=None, **sections) -> dict:
    model = {"path": str(random_tiny_model[0]), "lora": {**LORA, **(lora or {})}}
    sections = {"plugins": ["reward_plugins"], "reward": REWARD, "model": model, "optim": {"lr": 1e-2}, **sections}
    return small_run_recipe(random_tiny_model[0], out, **sections)


def stable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in metrics]


@pytest.fixture
def lora_parts(random_tiny_model, tmp_path, monkeypatch):
    """(parts, recipe, dist, number of model loads) of a LoRA run measuring KL to pi_0 every step."""
    loads = []
    real_load = build.load_model_and_tokenizer
    monkeypatch.setattr(build, "load_model_and_tokenizer", lambda recipe: loads.append(1) or real_load(recipe))
    recipe = load_recipe(lora_recipe(random_tiny_model, tmp_path / "run", dynamics={"kl_to_initial_every": 1}))
    dist = init_distributed()
    return build.build_run(recipe, dist), recipe, dist, loads


def test_only_adapters_train_and_reach_the_optimizer(lora_parts):
    from urlvr.trainer.actor import AdapterOffReference

    parts, _, _, loads = lora_parts
    named = dict(parts.actor.model.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # 2 layers x 3 targets x (A, B)
    assert len(trainable) == 2 * 3 * 2
    assert all(any(t in name for t in LORA["target_modules"]) for name in trainable)
    in_optimizer = {id(p) for group in parts.actor.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(named[name]) for name in trainable}
    # the KL reference is the actor itself with its adapters off: the model was loaded once
    assert isinstance(parts.reference, AdapterOffReference) and len(loads) == 1


def test_lora_steps_move_only_the_adapters_and_kl_grows_from_zero(lora_parts):
    from urlvr.trainer.loop import grpo_step

    parts, recipe, dist, _ = lora_parts
    model = parts.actor.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kl = []
    for step in (1, 2, 3):
        metrics, _, _ = grpo_step(parts, dist, step)
        kl.append(metrics["actor/kl_to_initial"])
        assert metrics["actor/ratio_min"] == metrics["actor/ratio_max"] == 1.0  # dropout 0: still on-policy
    after = model.state_dict()
    base = [k for k in before if "lora_" not in k]
    adapters = [k for k in before if "lora_" in k]
    assert base and all(torch.equal(before[k], after[k]) for k in base), "a base weight moved"
    assert any(not torch.equal(before[k], after[k]) for k in adapters if ".lora_B." in k), "no adapter moved"
    assert kl[0] == 0.0  # B = 0 at init: the policy is the base model exactly
    assert kl[1] > 0.0 and kl[2] > 0.0


def test_merged_sync_weights_are_the_merged_model_and_leave_the_module_alone(random_tiny_model):
    from peft import LoraConfig, get_peft_model

    from urlvr.rollout.weight_sync import iter_weights

    base = copy.deepcopy(random_tiny_model[1])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    weights = dict(iter_weights(peft_model, bucket_bytes=4096))
    assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items()), "sync changed the module"
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = dict(merged.named_parameters(remove_duplicate=False))
    assert weights.keys() == expected.keys()  # the base checkpoint's names, no lora_ or base_layer
    for name, value in weights.items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    changed = [k for k in weights if not torch.equal(weights[k], random_tiny_model[1].state_dict()[k])]
    assert sorted({k.split(".")[-2] for k in changed}) == ["o_proj", "q_proj"]


def test_lora_on_the_embeddings_or_head_is_refused(random_tiny_model, tmp_path):
    from urlvr.models.lora import apply_lora
    from urlvr.recipe.sections.generation import LoraSection

    with pytest.raises(urlvr.RecipeError, match="LM head and the token embeddings"):
        load_recipe(lora_recipe(random_tiny_model, tmp_path, lora={"target_modules": ["q_proj", "lm_head"]}))
    # whatever names reach the head or embeddings in another model, building the adapters refuses them
    section = LoraSection.model_construct(rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "lm_head"])
    with pytest.raises(urlvr.RecipeError, match="embeddings or the LM head"):
        apply_lora(copy.deepcopy(random_tiny_model[1]), section)


def test_lora_resume_is_exact_and_checkpoints_hold_only_the_adapters(random_tiny_model, tmp_path):
    straight = urlvr.train(lora_recipe(random_tiny_model, tmp_path / "straight", trainer={"total_steps": 4}))
    first = urlvr.train(lora_recipe(random_tiny_model, tmp_path / "split", trainer={"total_steps": 2}))
    module_state = torch.load(first.run_dir / "checkpoints/step-000002/deepspeed/mp_rank_00_model_states.pt",
                              weights_only=False)["module"]
    assert module_state and all("lora_" in k for k in module_state), "the frozen base was checkpointed"
    resumed = urlvr.train(lora_recipe(random_tiny_model, tmp_path / "ignored", trainer={"total_steps": 4}),
                          resume=first.run_dir)
    assert stable(first.metrics + resumed.metrics) == stable(straight.metrics)
    a = load_file(straight.final_model_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_model_dir / "adapter_model.safetensors")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exported(random_tiny_model, tmp_path_factory):
    """A 2-step LoRA run (ZeRO-0) that exports the adapter and the merged model."""
    return urlvr.train(lora_recipe(random_tiny_model, tmp_path_factory.mktemp("lora") / "run",
                                   lora={"export_merged": True}))


def test_exports_load_with_peft_and_merged_with_transformers(exported, random_tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = exported.final_model_dir
    assert not (final / "model.safetensors").exists()  # the adapter, not a copy of the base
    base = AutoModelForCausalLM.from_pretrained(random_tiny_model[0])
    trained = PeftModel.from_pretrained(base, final).eval()
    assert any(float(p.abs().max()) > 0 for n, p in trained.named_parameters() if "lora_B" in n), "adapter not trained"
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(random_tiny_model[0])(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5), float((want - got).abs().max())
    assert not torch.allclose(want, plain, atol=1e-5)  # and the adapters did change the model


def test_zero3_lora_trains_and_exports_like_zero0(exported, random_tiny_model, tmp_path):
    """ZeRO-3 partitions the frozen base and the adapters: the sync/export gathers (adapters
    with their base weight, bucket by bucket) give ZeRO-0's adapter and merged model."""
    result = urlvr.train(lora_recipe(random_tiny_model, tmp_path / "run", lora={"export_merged": True},
                                     optim={"lr": 1e-2, "deepspeed": {"zero_stage": 3}}))
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        want, got = load_file(exported.final_model_dir / name), load_file(result.final_model_dir / name)
        assert want.keys() == got.keys()
        assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-5, name


def test_gradient_checkpointing_and_adapter_dropout_still_train_the_adapters(random_tiny_model, tmp_path):
    """Checkpointed blocks over frozen embeddings get no gradient unless the input requires one
    (the classic LoRA pitfall); dropout acts in the training forward only."""
    from urlvr.trainer.loop import grpo_step

    raw = lora_recipe(random_tiny_model, tmp_path / "run", lora={"dropout": 0.5})
    recipe = load_recipe({**raw, "model": {**raw["model"], "gradient_checkpointing": True}})
    dist = init_distributed()
    parts = build.build_run(recipe, dist)
    first, _, _ = grpo_step(parts, dist, 1)
    assert first["actor/grad_norm"] > 0.0
    assert any(float(p.abs().max()) > 0 for n, p in parts.actor.model.named_parameters() if "lora_B" in n)
    assert all(not m.training for m in parts.actor.adapter_dropouts)  # back to eval after the training forward
    # step 1: B = 0, so dropout on the adapters' input changes nothing yet; step 2: it does
    assert first["actor/ratio_max"] == first["actor/ratio_min"] == 1.0
    second, _, _ = grpo_step(parts, dist, 2)
    assert second["actor/ratio_max"] != 1.0 or second["actor/ratio_min"] != 1.0
