"""The embedded tiny model: a 0.4M-parameter chat LM with a real, imperfect arithmetic prior.

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
loads unchanged. See docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from urlvr.data.records import PromptRecord
from urlvr.data.synthetic import arithmetic_problems

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
    from transformers import PreTrainedTokenizerFast

TINY_MODEL_ALIAS = "urlvr/tiny"
ASSET_DIR = Path(__file__).parent / "assets" / "tiny"
CACHE_SUBDIR = "tiny-v1"  # bump when the build recipe changes, so stale caches are not reused
# The aligned prior: the same build with seed 2, whose majority answer is right on most held-out
# prompts (75% greedy), so majority voting first *raises* ground truth (docs/probe.md).
ALIGNED_MODEL_ALIAS = "urlvr/tiny-aligned"
ALIGNED_ASSET_DIR = Path(__file__).parent / "assets" / "tiny-aligned"
ALIGNED_CACHE_SUBDIR = "tiny-aligned-v1"
ALIGNED_SEED = 2
INFO_FILE = "urlvr_tiny.json"  # written last: its presence marks a complete build
REQUIRED_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", INFO_FILE
)

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A question is held out iff crc32(question) % HELDOUT_MODULUS == 0: a fixed random ~10% split
# of the problem space, so held-out problems are never trained on, whatever the build settings.
HELDOUT_MODULUS = 10
HELDOUT_SEED = 20_240_607
TRAIN_SEED_BASE = 1_000  # the warm-up draws problems with seed TRAIN_SEED_BASE + build seed


@dataclass(frozen=True)
class TinyModelSettings:
    """Architecture and warm-up recipe; ``seed`` and ``warmup_steps`` are build arguments."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim = 32: vLLM's CPU attention rejects head_dim < 32
    num_kv_heads: int = 2
    intermediate_size: int = 384  # 256 learnt markedly slower for the same wall time
    max_position_embeddings: int = 512
    batch_size: int = 32  # per example seen, 32 learnt ~2x faster than 64; 16 was noisy
    learning_rate: float = 3e-3  # 2e-3 and 4e-3 both ended lower at the same budget
    lr_warmup_steps: int = 20
    weight_decay: float = 0.01
    max_operand: int = 99


DEFAULT_SEED = 0
DEFAULT_WARMUP_STEPS = 400  # seed 0: 41% held-out greedy (seeds 1, 2: 40%, 71%); 300 ~25%


# --------------------------------------------------------------------------- text formats
def is_heldout_question(question: str) -> bool:
    """True for questions in the fixed held-out split (never used by the warm-up)."""
    return zlib.crc32(question.encode()) % HELDOUT_MODULUS == 0


def heldout_problems(num_problems: int, *, max_operand: int = 99) -> list[PromptRecord]:
    """``num_problems`` distinct arithmetic problems from the held-out split (deterministic)."""
    draws = num_problems * HELDOUT_MODULUS * 4  # ~4x what the split needs: duplicates are rare
    pool = arithmetic_problems(draws, HELDOUT_SEED, max_value=max_operand)
    chosen: dict[str, PromptRecord] = {}
    for record in pool:
        if is_heldout_question(record.prompt):
            chosen.setdefault(record.prompt, record)
        if len(chosen) == num_problems:
            return list(chosen.values())
    raise ValueError(f"only {len(chosen)} held-out problems available, asked for {num_problems}")


def render_prompt(question: str) -> str:
    """The chat template applied to one user turn with ``add_generation_prompt=True``."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def target_response(record: PromptRecord) -> str:
    """What the warm-up teaches: units, tens, recombine, then the boxed answer.

    ``23+48: 3+8=11, 20+40=60, 60+11=71. The answer is \\boxed{71}.`` Each step is a one-digit
    fact written right after its operands, at offsets a 2-layer model learns to attend to fast.
    Writing only ``23+48=71`` (carrying "in its head") stayed near 5% at this budget, and
    ``23+48=20+40+3+8=60+11=71`` needed ~1.3x the steps for the same accuracy.
    """
    meta = record.metadata
    left, op, right, answer = meta["left"], meta["operator"], meta["right"], record.label
    if op not in "+-":
        return f"{left}{op}{right}={answer}. The answer is \\boxed{{{answer}}}."
    left_tens, right_tens = left // 10 * 10, right // 10 * 10
    units = left % 10 + right % 10 if op == "+" else left % 10 - right % 10
    tens = left_tens + right_tens if op == "+" else left_tens - right_tens
    return (
        f"{left}{op}{right}: {left % 10}{op}{right % 10}={units}, "
        f"{left_tens}{op}{right_tens}={tens}, "
        f"{tens}{'+' if units >= 0 else '-'}{abs(units)}={answer}. "
        f"The answer is \\boxed{{{answer}}}."
    )


def boxed_answer(text: str) -> str | None:
    """The integer in the last ``\\boxed{...}``, or None. Kept local (not the reward package's
    extractor) so that the builder and its measured accuracy never change under it."""
    found = re.findall(r"\\boxed\{\s*(-?\d+)\s*\}", text)
    return str(int(found[-1])) if found else None


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges (token id = byte value) plus the three chat specials.

    Byte-level rather than a character list so that any UTF-8 prompt round-trips without an
    unknown token; no regex pre-split because, with no merges, it would change nothing.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, IM_START, IM_END)]
    )
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers wrapper that ``save_pretrained`` writes (chat template, eos <|im_end|>)."""
    from transformers import PreTrainedTokenizerFast  # heavy (seconds), loaded on demand: a model is built

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=TinyModelSettings.max_position_embeddings,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), 256)
    unprintable = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + unprintable.index(b)) for b in range(256)}


# --------------------------------------------------------------------------- model + warm-up
def build_model(settings: TinyModelSettings, tokenizer: Tokenizer, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama-typed causal LM (= Qwen2 without the q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy (seconds), loaded on demand: a model is built

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),  # 256 bytes + 3 specials: every id decodes
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
        bos_token_id=tokenizer.token_to_id(PAD_TOKEN),  # as in Qwen: declared, never prepended
        eos_token_id=tokenizer.token_to_id(IM_END),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


def encode_examples(
    tokenizer: Tokenizer, records: Sequence[PromptRecord], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [N, T] and ``labels`` [N, T] (-100 outside the response)."""
    prompts = tokenizer.encode_batch([render_prompt(r.prompt) for r in records])
    responses = tokenizer.encode_batch([target_response(r) + IM_END for r in records])
    length = max(len(p.ids) + len(a.ids) for p, a in zip(prompts, responses))
    input_ids = torch.full((len(records), length), pad_id, dtype=torch.long)
    labels = torch.full((len(records), length), -100, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = prompt.ids + response.ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt.ids) : len(ids)] = torch.tensor(response.ids)
    return input_ids, labels


def warm_up(
    model: PreTrainedModel, tokenizer: Tokenizer, settings: TinyModelSettings, seed: int, steps: int
) -> list[float]:
    """Supervised fine-tuning on fresh training-split problems; returns the per-step losses.

    Every step sees new problems (no epochs), so held-out accuracy measures arithmetic the
    model learned, not problems it memorised. Stopping after ``steps`` keeps it imperfect.
    """
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    needed = steps * settings.batch_size
    pool = arithmetic_problems(needed * 2, TRAIN_SEED_BASE + seed, max_value=settings.max_operand)
    train = [r for r in pool if not is_heldout_question(r.prompt)][:needed]
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        betas=(0.9, 0.98),
        weight_decay=settings.weight_decay,
    )

    # Linear warm-up, then linear decay to 10%. Decaying from the start beat constant-then-decay
    # by a wide margin at this budget: the exact digit facts are learnt at the lower rates.
    def lr_factor(step: int) -> float:
        if step < settings.lr_warmup_steps:
            return (step + 1) / settings.lr_warmup_steps
        decay_steps = max(1, steps - settings.lr_warmup_steps)
        return 1.0 - 0.9 * (step - settings.lr_warmup_steps) / decay_steps

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step in range(steps):
        batch = train[step * settings.batch_size : (step + 1) * settings.batch_size]
        input_ids, labels = encode_examples(tokenizer, batch, pad_id)  # [B, T], [B, T]
        # No attention mask: padding is on the right, so under the causal mask no real token
        # ever sees a pad, and pads carry no loss. Skipping it takes the faster SDPA path.
        logits = model(input_ids=input_ids).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(  # next-token loss on response tokens only
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[PromptRecord],
    *,
    group_size: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[str | None]]:
    """Boxed answers per record: greedy when ``temperature == 0``, else ``group_size`` samples.

    Sets left padding on ``tokenizer``. Samples under a forked RNG seeded with ``seed``, so a
    measurement is repeatable and leaves the caller's random state alone.
    """
    tokenizer.padding_side = "left"
    prompts = [render_prompt(r.prompt) for r in records for _ in range(group_size)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        sampling = {"do_sample": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(**batch, max_new_tokens=96, **sampling)
    new_tokens = output[:, batch["input_ids"].shape[1] :]  # [len(prompts), <= 96]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    answers = [boxed_answer(text) for text in texts]
    return [answers[i * group_size : (i + 1) * group_size] for i in range(len(records))]


def measure_prior(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_problems: int = 256,
    num_sampled: int = 64,
    group_size: int = 8,
) -> dict[str, float]:
    """Held-out greedy accuracy; T=1 accuracy and the share of groups of ``group_size`` samples
    that disagree, on the first ``num_sampled`` problems."""
    problems = heldout_problems(num_problems)
    labels = [r.label for r in problems]
    greedy = sample_answers(model, tokenizer, problems)
    groups = sample_answers(
        model, tokenizer, problems[:num_sampled], group_size=group_size, temperature=1.0
    )
    num_samples = num_sampled * group_size
    return {
        "num_problems": num_problems,
        "greedy_accuracy": sum(g[0] == y for g, y in zip(greedy, labels)) / num_problems,
        "sampled_problems": num_sampled,
        "sampled_group_size": group_size,
        "sampled_accuracy": sum(a == y for g, y in zip(groups, labels) for a in g) / num_samples,
        "sampled_disagreement_rate": sum(len(set(g)) > 1 for g in groups) / num_sampled,
    }


# --------------------------------------------------------------------------- build / locate
def build_tiny_model(
    output_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    settings: TinyModelSettings = TinyModelSettings(),
    num_threads: int | None = 1,
    eval_problems: int = 256,
) -> Path:
    """Build tokenizer + model, warm up, save both in HF format under ``output_dir``; return it.

    Same seed, settings, thread count and machine give the same weights. One thread by default:
    the model is too small to gain much from two, and a second thread on a busy 2-core machine
    slows it several-fold. ``urlvr_tiny.json`` (written last) records the settings, timings and
    the measured held-out prior (``eval_problems=0`` skips the measurement).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / INFO_FILE).unlink(missing_ok=True)  # an interrupted rebuild is not complete
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        started, started_cpu = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[]):
            tokenizer = build_tokenizer()
            model = build_model(settings, tokenizer, seed)
            losses = warm_up(model, tokenizer, settings, seed, warmup_steps)
        warmup_seconds = time.perf_counter() - started
        warmup_cpu_seconds = time.process_time() - started_cpu
        hf_tokenizer = wrap_tokenizer(tokenizer)
        prior = None
        if eval_problems:
            prior = measure_prior(model, hf_tokenizer, num_problems=eval_problems)
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
        "warmup_seconds": round(warmup_seconds, 1),  # wall clock: inflated on a busy machine
        "warmup_cpu_seconds": round(warmup_cpu_seconds, 1),
        "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "heldout": prior,
        "torch_version": torch.__version__,
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def is_complete(model_dir: Path) -> bool:
    """True when every file a loader needs is present (the info file is written last)."""
    return all((Path(model_dir) / name).is_file() for name in REQUIRED_FILES)


def ensure_tiny_model(cache_dir: Path | None = None, *, aligned: bool = False) -> Path:
    """The committed asset if complete; otherwise a cached build, built once and atomically.
    ``aligned=True``: the aligned prior (`urlvr/tiny-aligned`, build seed 2) instead.

    Without the asset (e.g. a source tree that dropped it) the model is built at
    ``<root>/tiny-v1`` with root = ``cache_dir``, else ``$URLVR_CACHE``, else ``~/.cache/urlvr``,
    and reused from then on. The build goes to a temporary sibling that is renamed into place,
    so a concurrent or interrupted build never leaves a half-written model at the final path.
    """
    asset, subdir, seed = (ALIGNED_ASSET_DIR, ALIGNED_CACHE_SUBDIR, ALIGNED_SEED) if aligned else (
        ASSET_DIR, CACHE_SUBDIR, DEFAULT_SEED)
    if is_complete(asset):
        return asset
    root = Path(cache_dir or os.environ.get("URLVR_CACHE") or Path.home() / ".cache" / "urlvr")
    target = root / subdir
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{subdir}-", dir=root))
    try:
        build_tiny_model(staging, seed=seed)
        try:
            staging.rename(target)
        except OSError:  # another process got there first, or a stale partial dir is in the way
            if not is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(path: str) -> str:
    """Map the ``urlvr/tiny`` and ``urlvr/tiny-aligned`` aliases to local directories; any other
    path is returned unchanged."""
    if path in (TINY_MODEL_ALIAS, ALIGNED_MODEL_ALIAS):
        return str(ensure_tiny_model(aligned=path == ALIGNED_MODEL_ALIAS))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m urlvr.models.tiny --out DIR``: build, then print the recorded build info."""
    parser = argparse.ArgumentParser(
        prog="python -m urlvr.models.tiny", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the HF model")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the build")
    parser.add_argument(
        "--eval-problems", type=int, default=256, help="held-out problems to measure (0: skip)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = build_tiny_model(
        args.out,
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        num_threads=args.threads,
        eval_problems=args.eval_problems,
    )
    info = json.loads((out / INFO_FILE).read_text())
    total_seconds = round(time.perf_counter() - started, 1)
    print(json.dumps({"out": str(out), "total_seconds": total_seconds, **info}, indent=2))


if __name__ == "__main__":
    main()
