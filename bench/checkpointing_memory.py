"""What `model.gradient_checkpointing` saves: bytes the autograd graph holds after the training forward.

    .venv/bin/python bench/checkpointing_memory.py                     # Qwen2.5-0.5B-shaped blocks, 640 and 2,176 tokens
    .venv/bin/python bench/checkpointing_memory.py --lengths 512 4096 --hidden 2048 --intermediate 11008

One training forward of urlvr's `TokenScorer` (decoder + the recomputing LM head, log-probs of the
response) on a random Llama with `--hidden`/`--intermediate`/`--heads`/`--kv-heads` blocks, with and
without `checkpoint_decoder_blocks`. Measured with `torch.autograd.graph.saved_tensors_hooks`: the
distinct storages the graph saves for the backward, parameters excluded -- what stays allocated
from the forward to the backward, not RSS or allocator noise. Run with 1 and 2 blocks, so the
difference is the cost of one block; printed per token.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from urlvr.trainer.actor import TokenScorer
from urlvr.trainer.activation_checkpointing import checkpoint_decoder_blocks


def saved_bytes(model: torch.nn.Module, prompt: int, response: int, vocab: int) -> int:
    ids = torch.randint(0, vocab, (1, prompt + response))
    positions = torch.arange(prompt + response)[None]
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = TokenScorer(model)(ids, torch.ones_like(ids), positions, prompt, 1.0, ("logprob",))
    out["logprob"].sum().backward()
    return sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="response tokens")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=2, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.prompt + max(args.lengths), attn_implementation="sdpa")
    two = LlamaForCausalLM(config).eval()
    one = copy.deepcopy(two)
    one.model.layers = one.model.layers[:1]
    models = {"plain": (one, two)}
    models["checkpointed"] = tuple(copy.deepcopy(m) for m in models["plain"])
    for model in models["checkpointed"]:
        checkpoint_decoder_blocks(model)
    for response in args.lengths:
        tokens = args.prompt + response
        row = []
        for name, (short, long) in models.items():
            block = saved_bytes(long, args.prompt, response, args.vocab) - saved_bytes(short, args.prompt, response, args.vocab)
            row.append(f"{name} {block / tokens:,.0f} B/token/block ({block / 2**20:.1f} MiB)")
        print(f"{tokens} tokens: " + ", ".join(row))


if __name__ == "__main__":
    main()
