"""The embedded tiny model: committed asset loads offline, tokenizer ids round-trip through
``AutoTokenizer``, the chat template matches what the warm-up trained on, and the prior is real
(right often, wrong sometimes, samples disagree)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from urlvr.models import tiny
from urlvr.models.tiny import (
    ASSET_DIR,
    IM_END,
    INFO_FILE,
    TINY_MODEL_ALIAS,
    boxed_answer,
    build_tiny_model,
    build_tokenizer,
    ensure_tiny_model,
    heldout_problems,
    is_heldout_question,
    render_prompt,
    resolve_model_path,
    sample_answers,
    target_response,
)

ROUND_TRIP_STRINGS = [
    "Compute 23+48.",
    "23+48: 3+8=11, 20+40=60, 60+11=71. The answer is \\boxed{71}.",
    "  leading and trailing spaces  ",
    "digits 0123456789 and -42, tabs\tand\nnewlines",
    "\\boxed{} \\boxed{-7} {nested {braces}}",
    "unicode: café, 中文, emoji 🙂",
    render_prompt("Compute 5-33.") + "5-33=-28. The answer is \\boxed{-28}." + IM_END,
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: a second thread buys nothing and, on a shared 2-core box, costs 5x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def asset():
    """(model, tokenizer) loaded from the committed asset through the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny.is_complete(ASSET_DIR), f"committed asset missing or incomplete: {ASSET_DIR}"
    model = AutoModelForCausalLM.from_pretrained(ASSET_DIR)
    tokenizer = AutoTokenizer.from_pretrained(ASSET_DIR)
    model.eval()
    return model, tokenizer


def test_asset_is_small_llama_with_vllm_friendly_heads(asset) -> None:
    model, tokenizer = asset
    config = model.config
    assert config.model_type == "llama" and not config.attention_bias
    assert config.head_dim >= 32 and config.num_key_value_heads < config.num_attention_heads
    assert (ASSET_DIR / "model.safetensors").stat().st_size <= 5 * 1024 * 1024
    assert tokenizer.eos_token == IM_END
    assert config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert config.vocab_size == len(tokenizer)


def test_token_ids_round_trip_through_auto_tokenizer(asset) -> None:
    _, tokenizer = asset
    in_memory = build_tokenizer()
    for text in ROUND_TRIP_STRINGS:
        ids = in_memory.encode(text, add_special_tokens=False).ids
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text
        assert in_memory.decode(ids, skip_special_tokens=False) == text
    # the chat specials are single tokens, and the template output encodes identically
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 1+2."}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(chat, add_special_tokens=False)["input_ids"] == in_memory.encode(chat).ids
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_matches_training_format(asset) -> None:
    _, tokenizer = asset
    messages = [{"role": "user", "content": "Compute 23+48."}]
    with_prompt = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert with_prompt == render_prompt("Compute 23+48.")
    assert with_prompt.endswith("<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == "<|im_start|>user\nCompute 23+48.<|im_end|>\n"
    system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_greedy_generation_boxes_and_stops_at_eos(asset) -> None:
    model, tokenizer = asset
    problems = heldout_problems(4)
    tokenizer.padding_side = "left"
    prompts = [render_prompt(r.prompt) for r in problems]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=96, do_sample=False)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    for row in new_tokens.tolist():
        assert tokenizer.eos_token_id in row, "generation did not stop at <|im_end|>"
        end = row.index(tokenizer.eos_token_id)
        assert all(t == tokenizer.pad_token_id for t in row[end + 1 :])
        assert "\\boxed{" in tokenizer.decode(row[:end])


def test_prior_is_real_but_imperfect(asset) -> None:
    """What RL needs to amplify: right a fair share of the time, and groups that disagree."""
    model, tokenizer = asset
    problems = heldout_problems(64)
    greedy = sample_answers(model, tokenizer, problems)
    accuracy = sum(g[0] == r.label for g, r in zip(greedy, problems)) / len(problems)
    assert 0.2 <= accuracy <= 0.95, accuracy
    groups = sample_answers(model, tokenizer, problems[:16], group_size=8, temperature=1.0, seed=1)
    disagreeing = sum(len(set(group)) > 1 for group in groups)
    assert disagreeing >= 2, groups
    assert sum(a is not None for group in groups for a in group) >= 0.9 * 16 * 8  # format is stable
    info = json.loads((ASSET_DIR / INFO_FILE).read_text())
    assert 0.2 <= info["heldout"]["greedy_accuracy"] <= 0.95


def test_training_format_and_heldout_split() -> None:
    problems = heldout_problems(32)
    assert len({r.prompt for r in problems}) == 32
    assert all(is_heldout_question(r.prompt) for r in problems)
    for record in problems:
        assert boxed_answer(target_response(record)) == record.label


def test_alias_resolution() -> None:
    assert resolve_model_path(TINY_MODEL_ALIAS) == str(ASSET_DIR)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert ensure_tiny_model() == ASSET_DIR


def test_aligned_prior_is_committed_small_and_stronger() -> None:
    """The second asset (`urlvr/tiny-aligned`, build seed 2): same architecture, recorded prior
    above the default's (docs/tiny-model.md; `urlvr probe` measures the majority itself)."""
    assert resolve_model_path(tiny.ALIGNED_MODEL_ALIAS) == str(tiny.ALIGNED_ASSET_DIR)
    assert tiny.is_complete(tiny.ALIGNED_ASSET_DIR)
    assert (tiny.ALIGNED_ASSET_DIR / "model.safetensors").stat().st_size <= 5 * 1024 * 1024
    aligned = json.loads((tiny.ALIGNED_ASSET_DIR / INFO_FILE).read_text())
    default = json.loads((ASSET_DIR / INFO_FILE).read_text())
    assert aligned["seed"] == tiny.ALIGNED_SEED and aligned["settings"] == default["settings"]
    assert aligned["heldout"]["greedy_accuracy"] > default["heldout"]["greedy_accuracy"] + 0.2


def _short_build(output_dir: Path, seed: int = 0) -> Path:
    return build_tiny_model(output_dir, seed=seed, warmup_steps=3, eval_problems=0, num_threads=1)


def test_short_build_loads_and_is_deterministic(tmp_path: Path, asset) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, second = _short_build(tmp_path / "a"), _short_build(tmp_path / "b")
    assert tiny.is_complete(first)
    model = AutoModelForCausalLM.from_pretrained(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    _, asset_tokenizer = asset
    for text in ROUND_TRIP_STRINGS:
        assert tokenizer(text)["input_ids"] == asset_tokenizer(text)["input_ids"]
    assert model.config.to_dict()["num_hidden_layers"] == asset[0].config.num_hidden_layers
    weights_a = load_file(first / "model.safetensors")
    weights_b = load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    weights_c = load_file(_short_build(tmp_path / "c", seed=1) / "model.safetensors")
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


def test_ensure_builds_cache_once_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the committed asset, the model is built once into the cache and then reused."""
    quick_build = functools.partial(tiny.build_tiny_model, warmup_steps=1, eval_problems=0)
    monkeypatch.setattr(tiny, "build_tiny_model", quick_build)
    monkeypatch.setattr(tiny, "ASSET_DIR", tmp_path / "no-asset")
    built = ensure_tiny_model(tmp_path)
    assert built == tmp_path / tiny.CACHE_SUBDIR and tiny.is_complete(built)
    assert [p.name for p in tmp_path.iterdir()] == [tiny.CACHE_SUBDIR]  # no staging dir left behind

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt a complete cache")

    monkeypatch.setattr(tiny, "build_tiny_model", refuse)
    assert ensure_tiny_model(tmp_path) == built
    monkeypatch.setenv("URLVR_CACHE", str(tmp_path))
    assert ensure_tiny_model() == built
    assert resolve_model_path(TINY_MODEL_ALIAS) == str(built)


def test_cli_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.main(["--out", str(tmp_path / "cli"), "--warmup-steps", "1", "--eval-problems", "0"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["warmup_steps"] == 1 and printed["heldout"] is None
    assert tiny.is_complete(tmp_path / "cli")
