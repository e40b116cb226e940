"""`model.gradient_checkpointing` in a real urlvr step: every decoder block recomputes in the
backward of the training forward (never in the no-grad scoring pass), the autograd graph holds
far fewer bytes, and the step is the same step -- on every path the knob is accepted on."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import small_run_recipe
from urlvr.dist import init_distributed
from urlvr.recipe import load_recipe
from urlvr.trainer import build
from urlvr.trainer.loop import grpo_step

REWARD = {"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"}
# responses up to 64 tokens (the random model ends some early, so their lengths differ), the whole
# step in one micro-batch: what the graph holds at the end of its training forward is the peak
LONG = {"rollout": {"group_size": 4, "max_new_tokens": 64},
        "trainer": {"total_steps": 2, "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 16,
                    "save_every": 0}}
PATHS = {
    "full": {},
    "lora_dropout": {"model": {"lora": {"rank": 4, "dropout": 0.5}}, "optim": {"lr": 1e-2}},
    "padding_free": {"trainer": {**{k: v for k, v in LONG["trainer"].items() if k != "micro_batch_size"},
                                 "padding_free": True, "max_tokens_per_micro_batch": 400}},
    "zero3": {"optim": {"lr": 1e-3, "deepspeed": {"zero_stage": 3}}},
    "logits_head": {"algorithm": {"entropy_coef": 0.01}},  # entropy needs gradients: no recomputing LM head
}


def run_steps(random_tiny_model, out, checkpointing: bool, steps: int = 1, **sections) -> dict:
    """Run `steps` GRPO steps; count each block's MLP calls with and without gradients and the
    bytes of the activations autograd saves (parameters excluded, shared storage counted once)."""
    model = {"path": str(random_tiny_model[0]), "gradient_checkpointing": checkpointing,
             **sections.pop("model", {})}
    raw = small_run_recipe(random_tiny_model[0], out, plugins=["reward_plugins"], reward=REWARD,
                           **{**LONG, **sections, "model": model})
    recipe = load_recipe(raw)
    dist = init_distributed()
    parts = build.build_run(recipe, dist)
    calls = {True: 0, False: 0}

    def count(module, args):  # a pre-hook: a recompute stops once it has what the backward needs
        calls[torch.is_grad_enabled()] += 1

    blocks = [m for n, m in parts.actor.model.named_modules() if n.endswith("mlp")]
    for block in blocks:
        block.register_forward_pre_hook(count)
    parameters = {p.untyped_storage().data_ptr() for p in parts.actor.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    metrics = []
    for step in range(1, steps + 1):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            metrics.append(grpo_step(parts, dist, step)[0])
    weights = {k: v.detach().clone() for k, v in parts.actor.model.state_dict().items()}
    return {"calls": calls, "blocks": len(blocks), "saved_bytes": sum(saved.values()), "metrics": metrics,
            "weights": weights}


def stable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/tokens_per_second"))} for m in metrics]


def test_checkpointing_recomputes_every_block_and_holds_fewer_bytes(random_tiny_model, tmp_path):
    plain = run_steps(random_tiny_model, tmp_path / "plain", False)
    ckpt = run_steps(random_tiny_model, tmp_path / "ckpt", True)
    first = plain["metrics"][0]
    assert first["response/length_max"] > first["response/length_mean"]  # responses of different lengths
    blocks = plain["blocks"]
    assert blocks == 2
    # one training forward (one micro-batch): each block once, and once more in the backward
    assert plain["calls"][True] == blocks
    assert ckpt["calls"][True] == 2 * blocks
    assert ckpt["calls"][False] == plain["calls"][False] > 0  # the no-grad scoring pass pays nothing
    assert ckpt["saved_bytes"] < plain["saved_bytes"] / 4
    assert stable(ckpt["metrics"]) == stable(plain["metrics"])  # the ratio stays exactly 1 (logged)
    assert first["actor/ratio_min"] == first["actor/ratio_max"] == 1.0
    for name, want in plain["weights"].items():
        assert torch.equal(want, ckpt["weights"][name]), name


@pytest.mark.parametrize("path", sorted(PATHS))
def test_checkpointing_changes_no_update_on_any_path(random_tiny_model, tmp_path, path):
    """Two steps with and without checkpointing give the same weights and metrics on every path:
    LoRA with adapter dropout (the recompute redraws the forward's mask), packed micro-batches,
    ZeRO-3 (parameters gathered again for the recompute), and the logits-keeping LM head."""
    sections = copy.deepcopy(PATHS[path])
    plain = run_steps(random_tiny_model, tmp_path / "plain", False, steps=2, **copy.deepcopy(sections))
    ckpt = run_steps(random_tiny_model, tmp_path / "ckpt", True, steps=2, **sections)
    assert ckpt["calls"][True] == 2 * plain["calls"][True] > 0
    assert ckpt["saved_bytes"] < plain["saved_bytes"] / 2
    for name, want in plain["weights"].items():
        assert torch.allclose(want, ckpt["weights"][name], rtol=0, atol=1e-7), name
    for want, got in zip(stable(plain["metrics"]), stable(ckpt["metrics"])):
        assert want.keys() == got.keys()
        assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in want.items()), path
    assert plain["metrics"][0]["actor/ratio_min"] == ckpt["metrics"][0]["actor/ratio_max"] == 1.0


def test_a_copied_model_checkpoints_its_own_blocks(random_tiny_model):
    from urlvr.trainer.activation_checkpointing import checkpoint_decoder_blocks

    model = copy.deepcopy(random_tiny_model[1])
    assert checkpoint_decoder_blocks(model) == 2
    twin = copy.deepcopy(model)
    assert all(layer.forward.__self__ is layer for layer in twin.model.layers)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        want = random_tiny_model[1](ids).logits
    assert torch.equal(twin(ids).logits, want)


def test_a_model_without_checkpointable_blocks_is_refused():
    from urlvr.errors import RecipeError
    from urlvr.trainer.activation_checkpointing import checkpoint_decoder_blocks

    with pytest.raises(RecipeError, match="model.gradient_checkpointing: Sequential has no"):
        checkpoint_decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
