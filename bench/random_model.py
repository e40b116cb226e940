"""Random-init causal LMs for the benchmarks: a large vocabulary, and responses whose lengths vary.

    python bench/random_model.py OUT_DIR [--preset compute|memory|qwen3-0.6b] [--eos-rate R]

A random model samples nearly uniformly over its vocabulary, so its eos (1 token in 32k) almost
never comes and every response runs to the cap; real responses end at many lengths. To make the
benchmarks see real-looking lengths, one residual-stream dimension is made a constant (its
column of the embedding is ``c``, and no attention or MLP output writes into it), and the LM head
reads that dimension into the eos logit alone. The eos logit then carries a fixed offset,
calibrated so that eos comes with probability ``eos_rate`` per token: a constant hazard, so
lengths spread from a few tokens to the cap (``eos_rate = 1.5 / cap`` gives a mean of about
half the cap and about 22% of responses cut at it). A negative ``eos_rate`` (``--eos-rate -1``)
pushes eos down instead: no response ends early (the memory benchmark, "EOS ignored").
Every other weight keeps its random init, so the model's compute per token is untouched.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on synthetic text up to the
requested vocabulary, with urlvr's tiny-model chat template and specials; ``model.vocab_size``
may exceed it (Qwen3's 151,936 rows): ids beyond the tokenizer decode to nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    # ~25M parameters, 32k vocabulary: the compute-bound CPU benchmark
    "compute": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_layers=8, num_heads=4,
                    num_kv_heads=4, tie_word_embeddings=False),
    # small body, 32k vocabulary: where memory goes to [T, V] logits (2 x 4 x 2048 tokens)
    "memory": dict(vocab_size=32768, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2,
                   num_kv_heads=2, tie_word_embeddings=False, max_position_embeddings=4096),
    # Qwen3-0.6B's architecture (config.json of Qwen/Qwen3-0.6B), random init: the GPU check (eos ignored)
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960, tokenizer_vocab_size=32768),
    # a few-layer Qwen3 for the GPU check's CPU dry run
    "qwen3-dry": dict(arch="qwen3", vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=True,
                      tokenizer_vocab_size=1024),
}


@dataclass(frozen=True)
class RandomModelSettings:
    arch: str = "llama"
    vocab_size: int = 32768
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    tokenizer_vocab_size: int | None = None  # None: = vocab_size
    eos_rate: float = 0.0  # per-token eos probability; 0 = leave the random init; < 0 = never eos
    seed: int = 0


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE trained on synthetic text (arithmetic prompts + pseudo-words) to ``vocab_size``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from urlvr.data.synthetic import arithmetic_problems
    from urlvr.models.tiny import IM_END, IM_START, PAD_TOKEN

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = [r.prompt for r in arithmetic_problems(2000, seed=seed)]
    # enough distinct words that BPE finds vocab_size merges
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(4 * vocab_size)]
    corpus += [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, IM_START, IM_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[AddedToken(t, special=True) for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def build_model(settings: RandomModelSettings, pad_id: int, eos_id: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        settings.arch, vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim or settings.hidden_size // settings.num_heads,
        max_position_embeddings=settings.max_position_embeddings, tie_word_embeddings=settings.tie_word_embeddings,
        pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=eos_id, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_config(config)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    if settings.eos_rate:
        set_eos_rate(model, eos_id, settings.eos_rate)
    return model


@torch.no_grad()
def set_eos_rate(model, eos_id: int, eos_rate: float, constant: float = 1.0) -> float:
    """Give the eos logit a fixed offset so that eos is sampled with probability ``eos_rate`` per
    token (T = 1); ``eos_rate < 0``: an offset of -30 (eos never sampled). Returns the offset.

    With a tied head the constant embedding column is also the head's column: every logit then
    gets the same shift (no effect on the softmax) except eos's, whose entry carries the offset
    (eos as an input, as in a chat prompt, then has an odd value in that one dimension: harmless)."""
    body, dim = model.model, model.config.hidden_size - 1  # the residual dimension made constant
    body.embed_tokens.weight[:, dim] = constant
    for layer in body.layers:
        layer.self_attn.o_proj.weight[dim] = 0.0
        layer.mlp.down_proj.weight[dim] = 0.0
    head = model.lm_head.weight
    base = constant if model.config.tie_word_embeddings else 0.0
    head[:, dim] = base
    # What the final norm makes of that dimension, and how spread the other logits are.
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    ids[ids == eos_id] = 0
    hidden = body(input_ids=ids).last_hidden_state  # [4, 64, H], after the final norm
    normed = hidden[..., dim].mean().item()
    logits = model.lm_head(hidden).float()  # [4, 64, V]; eos's logit shares the others' shift here
    others = torch.logsumexp(logits, dim=-1).mean().item()
    offset = -30.0 if eos_rate < 0 else others - logits[..., eos_id].mean().item() + math.log(eos_rate / (1 - eos_rate))
    head[eos_id, dim] = base + offset / normed
    return offset


def save_random_model(out: Path, settings: RandomModelSettings) -> Path:
    """Build (once; reused while ``settings`` match) the model and tokenizer into ``out``."""
    from urlvr.models.tiny import IM_END, PAD_TOKEN, wrap_tokenizer

    stamp = out / "bench_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(settings):
        return out
    tokenizer = build_tokenizer(settings.tokenizer_vocab_size or settings.vocab_size, settings.seed)
    model = build_model(settings, tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(IM_END))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    wrapped = wrap_tokenizer(tokenizer)
    wrapped.model_max_length = settings.max_position_embeddings
    wrapped.save_pretrained(out)
    stamp.write_text(json.dumps(asdict(settings)))
    return out


def preset_settings(preset: str, **overrides) -> RandomModelSettings:
    return replace(RandomModelSettings(**PRESETS[preset]), **overrides)


def parameter_count(settings: RandomModelSettings) -> int:
    from transformers import AutoModelForCausalLM  # noqa: F401  (meta-device count, no weights)

    with torch.device("meta"):
        model = build_model(replace(settings, eos_rate=0.0), 0, 1)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="compute")
    parser.add_argument("--eos-rate", type=float, default=0.0)
    args = parser.parse_args()
    settings = preset_settings(args.preset, eos_rate=args.eos_rate)
    save_random_model(args.out, settings)
    print(f"{args.out}: {parameter_count(settings) / 1e6:.1f}M parameters, {settings}")


if __name__ == "__main__":
    main()
