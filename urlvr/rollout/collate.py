"""Groups -> tensors: prompts left-padded, responses right-padded, one row per sample.

Layout of one row (P = longest prompt, T = longest response):

    [pad pad p0 p1 p2 | r0 r1 r2 eos pad pad]
     <---- P -------->  <------- T ------->

Every response starts at column P, so "response token t" is column P + t in every row, and
``logits[:, P - 1 : P + T - 1]`` predict the whole response block in one slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from urlvr.rollout.base import Group, RolloutBatch


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids = max(cumsum(mask) - 1, 0): each real token's index among the real tokens of its row.

    Left padding shifts a prompt's columns, not its positions: the first real token gets
    position 0 whatever the padding. The rollout engine and the trainer's scoring pass both use
    this function, so the sampler and the scorer see identical positions (and identical
    log-probs up to float noise); pad columns get 0 and are masked out anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]


def collate_groups(groups: Sequence[Group], *, pad_token_id: int) -> RolloutBatch:
    """Stack ``groups`` into a ``RolloutBatch``; row ``g * group_size + j`` is sample ``j`` of group ``g``.

    ``attention_mask`` and ``response_mask`` are int64 0/1; ``sampler_logprobs`` is float32
    with 0 at padding. Raises ``ValueError`` for no groups, groups of different sizes, or a
    sample whose log-probs do not line up with its tokens.
    """
    if not groups:
        raise ValueError("collate_groups needs at least one group")
    group_size = groups[0].size
    sizes = sorted({group.size for group in groups})
    if len(sizes) > 1:
        raise ValueError(f"all groups must have the same size to collate, got sizes {sizes}")

    prompt_length = max(len(group.prompt.token_ids) for group in groups)
    response_length = max(len(sample.token_ids) for group in groups for sample in group.samples)
    rows = len(groups) * group_size

    input_ids = torch.full((rows, prompt_length + response_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, prompt_length + response_length), dtype=torch.long)
    response_mask = torch.zeros((rows, response_length), dtype=torch.long)
    sampler_logprobs = torch.zeros((rows, response_length), dtype=torch.float32)

    for g, group in enumerate(groups):
        prompt = torch.tensor(group.prompt.token_ids, dtype=torch.long)
        prompt_start = prompt_length - len(prompt)
        for j, sample in enumerate(group.samples):
            if len(sample.logprobs) != len(sample.token_ids):
                raise ValueError(
                    f"prompt {group.prompt.prompt_id!r} sample {j}: {len(sample.token_ids)} tokens "
                    f"but {len(sample.logprobs)} log-probs"
                )
            row, n = g * group_size + j, len(sample.token_ids)
            input_ids[row, prompt_start:prompt_length] = prompt
            response = torch.tensor(sample.token_ids, dtype=torch.long)
            input_ids[row, prompt_length : prompt_length + n] = response
            attention_mask[row, prompt_start : prompt_length + n] = 1
            response_mask[row, :n] = 1
            sampler_logprobs[row, :n] = torch.tensor(sample.logprobs, dtype=torch.float32)

    return RolloutBatch(
        input_ids=input_ids,  # [B*G, P+T]
        attention_mask=attention_mask,  # [B*G, P+T]
        response_mask=response_mask,  # [B*G, T]
        sampler_logprobs=sampler_logprobs,  # [B*G, T]
        prompt_length=prompt_length,
        group_size=group_size,
    )
