"""The starting model's answers to every training prompt, drawn once before step 1, for an
advantage shaping that weighs each prompt by them (`wants_reference_answers`: RESTRAIN's
prompt-level weight u_x = g(c_ref / n), arXiv 2510.02172 §3). Drawn by the run's own engine while
it still holds the starting weights, so the weights are fixed for the whole run, as the paper's
offline pass over a frozen model; saved with every checkpoint (trainer_state.json's
`advantage_shaping`), so a resume never draws them again from a trained model.
"""

from __future__ import annotations

from dataclasses import replace

from urlvr.algorithms.restrain import reference_share
from urlvr.dist import DistInfo, all_gather_objects, even_shard
from urlvr.errors import RecipeError


def reference_shares(parts, dist: DistInfo, say) -> dict[str, dict[str, float]]:
    """{prompt id: {"reference_share": c_ref / n}} for every training prompt: n = the voting samples
    per prompt, drawn by the engine with the rollout's sampling and seeds of step 0 (no training
    step has that number), each rank its even share of the prompts, a console line per batch.

    The batches are a training step's on one rank (its share of `prompts_per_step`), so the pass fits
    wherever a step's generation does; one generation context holds the whole pass: under ZeRO-3 it
    is a collective, and the ranks' shares (and so their numbers of batches) may differ by one prompt."""
    settings = parts.settings
    prompt_ids = list(dict.fromkeys(record.prompt_id for record in parts.stream.records))
    shard = even_shard(len(prompt_ids), dist.world_size, dist.rank)
    mine = prompt_ids[shard.start:shard.stop]
    per_call = -(-settings.recipe.trainer.prompts_per_step // dist.world_size)  # a step's prompts on one rank
    say(f"urlvr: drawing the starting model's answers for the prompt weights: {len(prompt_ids)} prompts x "
        f"{settings.vote_group_size} samples" + (f" ({len(mine)} on this rank)" if dist.world_size > 1 else ""))
    shares: list[tuple[str, float]] = []
    with parts.generation_context():
        for start in range(0, len(mine), per_call):
            batch = mine[start:start + per_call]
            sampling = replace(settings.policy_sampling(), prompt_seeds=tuple(
                settings.sampling_seed(0, shard.start + start + i) for i in range(len(batch))))
            groups = parts.engine.generate([parts.prompts[pid] for pid in batch], settings.vote_group_size, sampling)
            shares += [(pid, reference_share([settings.answer(s) for s in group.samples]))
                       for pid, group in zip(batch, groups)]
            say(f"urlvr: prompt weights: {start + len(batch)}/{len(mine)} prompts drawn")
    return {pid: {"reference_share": share} for pid, share in all_gather_objects(shares)}


def check_restored(state: dict, prompt_ids, shaping_name: str) -> None:
    """A resumed run's shaping state must hold every prompt's reference share: drawn now, they
    would come from the trained model, not the starting one."""
    missing = [pid for pid in prompt_ids if "reference_share" not in state.get(pid, {})]
    if missing:
        raise RecipeError(f"algorithm.advantage_shaping {shaping_name}: the checkpoint holds no starting-model answers "
                          f"for {len(missing)} prompts (first: {missing[0]!r}); they are drawn before step 1 of a new "
                          "run only: start a new run, or set prompt_weighting false")
