"""Shared fixtures. Keep this file to fixtures many test modules reuse."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _char_tokenizer():
    """A 64-token character-level tokenizer: 3 specials, then printable characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = list(string.digits + string.ascii_lowercase + " \n+-*/=().,:?<>{}[]\\!_#'\"")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    assert len(vocab) == 64, len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own pre-token, so WordLevel maps characters to ids one to one.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _bos_tokenizer():
    """A character-level tokenizer that prepends BOS ``<s>`` (id 1) like Llama-3/Gemma base models,
    with a chat template that writes ``{{ bos_token }}`` itself, as theirs do. Built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " ?:+=<>|/{}\n.,!'-"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        chat_template="{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )


@pytest.fixture
def bos_tokenizer():
    """See ``_bos_tokenizer``; shared by the template and policy-handle tests."""
    tokenizer = _bos_tokenizer()
    assert tokenizer("ab")["input_ids"][0] == tokenizer.bos_token_id == 1  # it really adds BOS
    return tokenizer


@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """``(path, model, tokenizer)``: a random-init 2-layer Llama (hidden 64, 4 heads, vocab 64)
    and a char-level tokenizer, both saved under ``path`` (loadable with ``from_pretrained``).

    Shared by the whole session: a test that changes the model (mode, weights, config) must
    restore it. The model is returned in eval mode, float32, on CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        # Larger than the usual 0.02 so the random model's next-token distributions are
        # peaked enough that greedy decoding has clear winners (robust to float noise).
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the global RNG where the session put it
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.eval()

    path: Path = tmp_path_factory.mktemp("random_tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def lora_with_random_adapters(model):
    """`model` wrapped in LoRA adapters (q, v, down projections) whose B matrices are drawn N(0, 1),
    seed 0: a merged weight far enough from the base to change greedy answers."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    return lora


def small_run_recipe(model_path: Path, output_dir: Path, **sections) -> dict:
    """A recipe dict for a few fast CPU steps on a saved tiny model (sections override by key)."""
    recipe = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"path": str(model_path)},
        "data": {"source": {"kind": "arithmetic", "num_problems": 32, "seed": 3}},
        "rollout": {"group_size": 4, "max_new_tokens": 12},
        "trainer": {"total_steps": 2, "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 8,
                    "save_every": 0},
        "optim": {"lr": 1e-3},
        "logging": {"console": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def process_alive(pid: int) -> bool:
    """Still running, read from /proc (Linux): a zombie waiting to be reaped counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no such process (FileNotFoundError, ProcessLookupError)
        return False
