"""The embedded tiny model: a ~1M-parameter chat LM with a real (imperfect) arithmetic prior.

Why it exists: GRPO on an untrained model teaches nothing -- every sample is noise, so rewards
are flat and advantages vanish. URLVR's claims are about *sharpening* a prior (majority voting
and certainty rewards amplify what the model already half-knows), so CPU tests and smoke
recipes need a model that is right a fair share of the time, wrong sometimes, and whose samples
disagree. This module builds one in about a minute: a byte-level tokenizer with a Qwen-style
chat template, a Llama-typed decoder, and a short supervised warm-up on synthetic arithmetic
(``urlvr.data.synthetic``) that is stopped well before the model is perfect.

Why Llama-typed: transformers 5 rebuilds any ``model_type=qwen2`` tokenizer as
``Qwen2Tokenizer``, which silently re-maps ids unless Qwen's own regex and vocabulary are used.
``LlamaConfig(attention_bias=False)`` is the Qwen2 architecture minus the q/k/v biases (RMSNorm,
rotary, SwiGLU, GQA), and with ``tokenizer_class=TokenizersBackend`` the saved tokenizer.json
loads byte for byte. See docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from urlvr.data.records import PromptRecord
from urlvr.data.synthetic import arithmetic_problems

TINY_MODEL_ALIAS = "urlvr/tiny"
ASSET_DIR = Path(__file__).parent / "assets" / "tiny"
CACHE_SUBDIR = "tiny-v1"  # bump when the build recipe changes, so stale caches are not reused
INFO_FILE = "urlvr_tiny.json"  # written last: its presence marks a complete build
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", INFO_FILE)

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

HELDOUT_SEED = 20_240_607
# A question is held out iff crc32(question) % HELDOUT_MODULUS == 0: a fixed random ~10% split
# of the problem space, so held-out problems are never trained on whatever the build settings.
HELDOUT_MODULUS = 10
TRAIN_SEED_BASE = 1_000  # training problems use seed TRAIN_SEED_BASE + build seed


@dataclass(frozen=True)
class TinyModelSettings:
    """Architecture and warm-up recipe; ``seed`` and ``warmup_steps`` are build arguments."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim = 32: vLLM's CPU attention rejects head_dim < 32
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    batch_size: int = 64
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 20
    weight_decay: float = 0.01
    max_operand: int = 99


DEFAULT_SEED = 0
DEFAULT_WARMUP_STEPS = 300


# --------------------------------------------------------------------------- text formats
def is_heldout_question(question: str) -> bool:
    """True for questions in the fixed held-out split (never used by the warm-up)."""
    return zlib.crc32(question.encode()) % HELDOUT_MODULUS == 0


def heldout_problems(num_problems: int, *, max_operand: int = 99) -> list[PromptRecord]:
    """``num_problems`` distinct arithmetic problems from the held-out split (deterministic)."""
    pool = arithmetic_problems(num_problems * HELDOUT_MODULUS * 4, HELDOUT_SEED, max_value=max_operand)
    chosen: dict[str, PromptRecord] = {}
    for record in pool:
        if is_heldout_question(record.prompt) and record.prompt not in chosen:
            chosen[record.prompt] = record
        if len(chosen) == num_problems:
            return list(chosen.values())
    raise ValueError(f"only {len(chosen)} held-out problems available, asked for {num_problems}")


def render_prompt(question: str) -> str:
    """The chat template applied to one user turn with ``add_generation_prompt=True``."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def target_response(record: PromptRecord) -> str:
    """What the warm-up teaches: a tens/units split, then the boxed answer.

    ``23+48=(20+40)+(3+8)=60+11=71. The answer is \\boxed{71}.`` -- each step is a one-digit
    fact or a carry, which a 2-layer model picks up in a few hundred steps; writing only
    ``23+48=71`` asks it to carry in its head and stays near chance at this budget.
    """
    meta = record.metadata
    left, op, right, answer = meta["left"], meta["operator"], meta["right"], record.label
    if op in "+-":
        tens = eval_int(left // 10 * 10, op, right // 10 * 10)
        units = eval_int(left % 10, op, right % 10)
        joined = f"{tens}{'+' if units >= 0 else '-'}{abs(units)}"
        working = f"({left // 10 * 10}{op}{right // 10 * 10})+({left % 10}{op}{right % 10})={joined}="
    else:
        working = ""
    return f"{left}{op}{right}={working}{answer}. The answer is \\boxed{{{answer}}}."


def eval_int(left: int, op: str, right: int) -> int:
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def boxed_answer(text: str) -> str | None:
    """The integer in the last ``\\boxed{...}``, or None (kept local so the builder has no
    dependency on the reward package)."""
    found = re.findall(r"\\boxed\{\s*(-?\d+)\s*\}", text)
    return str(int(found[-1])) if found else None


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    """Byte-level BPE with no merges (token id = byte value) plus the three chat specials.

    Byte-level rather than a character list so that any UTF-8 prompt round-trips without an
    unknown token; no regex pre-split because with no merges it would change nothing.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = _bytes_to_unicode()
    assert sorted(byte_chars.values()) == sorted(ByteLevel.alphabet())
    vocab = {byte_chars[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, IM_START, IM_END)])
    return tokenizer


def wrap_tokenizer(tokenizer):
    """The transformers wrapper that ``save_pretrained`` writes (chat template, eos = <|im_end|>)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# --------------------------------------------------------------------------- model + warm-up
def build_model(settings: TinyModelSettings, tokenizer, seed: int):
    """A freshly initialised Llama-typed (= Qwen2 without qkv bias) causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),  # 256 bytes + 3 specials: no id the tokenizer cannot decode
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.hidden_size // settings.num_heads,
        max_position_embeddings=settings.max_position_embeddings,
        attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.token_to_id(PAD_TOKEN),
        bos_token_id=tokenizer.token_to_id(PAD_TOKEN),  # like Qwen: declared, never prepended
        eos_token_id=tokenizer.token_to_id(IM_END),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


def encode_examples(tokenizer, records: Sequence[PromptRecord], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [N, T] and ``labels`` [N, T] (-100 outside the response)."""
    prompts = tokenizer.encode_batch([render_prompt(r.prompt) for r in records], add_special_tokens=False)
    responses = tokenizer.encode_batch([target_response(r) + IM_END for r in records], add_special_tokens=False)
    length = max(len(p.ids) + len(a.ids) for p, a in zip(prompts, responses))
    input_ids = torch.full((len(records), length), pad_id, dtype=torch.long)
    labels = torch.full((len(records), length), -100, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = prompt.ids + response.ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt.ids) : len(ids)] = torch.tensor(response.ids)
    return input_ids, labels


def warm_up(model, tokenizer, settings: TinyModelSettings, seed: int, steps: int) -> list[float]:
    """Supervised fine-tuning on fresh training-split problems; returns the per-step losses.

    Each step sees new problems (no epochs), so the held-out accuracy measures arithmetic the
    model learned, not problems it memorised. Stopping after ``steps`` is what keeps it imperfect.
    """
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    needed = steps * settings.batch_size
    pool = arithmetic_problems(needed * 2, TRAIN_SEED_BASE + seed, max_value=settings.max_operand)
    train = [r for r in pool if not is_heldout_question(r.prompt)][:needed]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), weight_decay=settings.weight_decay
    )
    # linear warm-up, then cosine to 10% of the peak
    def lr_factor(step: int) -> float:
        if step < settings.lr_warmup_steps:
            return (step + 1) / settings.lr_warmup_steps
        progress = (step - settings.lr_warmup_steps) / max(1, steps - settings.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step in range(steps):
        batch = train[step * settings.batch_size : (step + 1) * settings.batch_size]
        input_ids, labels = encode_examples(tokenizer, batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits
        # next-token loss on response tokens only: [N, T-1, V] vs [N, T-1]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sample_answers(
    model, tokenizer, records: Sequence[PromptRecord], *, group_size: int = 1, temperature: float = 0.0, seed: int = 0
) -> list[list[str | None]]:
    """Boxed answers per record: greedy when ``temperature == 0``, else ``group_size`` samples.

    ``tokenizer`` is a transformers tokenizer (left padding is set here); sampling runs under a
    forked RNG so that measuring does not disturb the caller's random state.
    """
    tokenizer.padding_side = "left"
    prompts = [render_prompt(r.prompt) for r in records for _ in range(group_size)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(**batch, max_new_tokens=96, **sampling)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [boxed_answer(t) for t in texts]
    return [answers[i * group_size : (i + 1) * group_size] for i in range(len(records))]


def measure_prior(model, tokenizer, *, num_problems: int = 256, group_size: int = 8, num_sampled: int = 64) -> dict:
    """Held-out greedy accuracy, sampled (T=1) accuracy, and how often a group disagrees."""
    problems = heldout_problems(num_problems)
    greedy = sample_answers(model, tokenizer, problems)
    sampled = sample_answers(model, tokenizer, problems[:num_sampled], group_size=group_size, temperature=1.0)
    labels = [r.label for r in problems]
    return {
        "num_problems": num_problems,
        "greedy_accuracy": sum(g[0] == y for g, y in zip(greedy, labels)) / num_problems,
        "sampled_group_size": group_size,
        "sampled_accuracy": sum(a == y for group, y in zip(sampled, labels) for a in group) / (num_sampled * group_size),
        "sampled_disagreement_rate": sum(len(set(group)) > 1 for group in sampled) / num_sampled,
    }


# --------------------------------------------------------------------------- build / locate
def build_tiny_model(
    output_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    settings: TinyModelSettings = TinyModelSettings(),
    num_threads: int | None = 2,
    eval_problems: int = 256,
) -> Path:
    """Build tokenizer + model, warm it up, save both in HF format under ``output_dir``.

    Same seed, settings, thread count and machine give the same weights. ``urlvr_tiny.json``
    (written last) records the settings, timings and the measured held-out prior.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            tokenizer = build_tokenizer()
            model = build_model(settings, tokenizer, seed)
            losses = warm_up(model, tokenizer, settings, seed, warmup_steps)
        warmup_seconds = time.perf_counter() - started
        hf_tokenizer = wrap_tokenizer(tokenizer)
        prior = measure_prior(model, hf_tokenizer, num_problems=eval_problems) if eval_problems else None
    finally:
        torch.set_num_threads(previous_threads)
    model.save_pretrained(output_dir)
    hf_tokenizer.save_pretrained(output_dir)
    info = {
        "alias": TINY_MODEL_ALIAS,
        "seed": seed,
        "warmup_steps": warmup_steps,
        "settings": asdict(settings),
        "num_threads": num_threads,
        "warmup_seconds": round(warmup_seconds, 1),
        "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "heldout": prior,
        "torch_version": torch.__version__,
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def is_complete(model_dir: Path) -> bool:
    """True when every file a loader needs is present (the info file is written last)."""
    return all((Path(model_dir) / name).is_file() for name in REQUIRED_FILES)


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """The committed asset if complete; otherwise a cached build, built once and atomically.

    The cache lives at ``<root>/tiny-v1`` with root = ``cache_dir``, else ``$URLVR_CACHE``, else
    ``~/.cache/urlvr``. The build goes to a temporary sibling that is renamed into place, so a
    concurrent or interrupted build never leaves a half-written model at the final path.
    """
    if cache_dir is None and is_complete(ASSET_DIR):
        return ASSET_DIR
    root = Path(cache_dir or os.environ.get("URLVR_CACHE") or Path.home() / ".cache" / "urlvr")
    target = root / CACHE_SUBDIR
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}-", dir=root))
    try:
        build_tiny_model(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first (or a stale partial dir is in the way)
            if not is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(path: str) -> str:
    """Map the ``urlvr/tiny`` alias to a local directory; any other path is returned unchanged."""
    return str(ensure_tiny_model()) if path == TINY_MODEL_ALIAS else path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m urlvr.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the HF model into")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads during the build")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = build_tiny_model(args.out, seed=args.seed, warmup_steps=args.warmup_steps, num_threads=args.threads)
    info = json.loads((out / INFO_FILE).read_text())
    print(json.dumps({"out": str(out), "total_seconds": round(time.perf_counter() - started, 1), **info}, indent=2))


if __name__ == "__main__":
    main()
