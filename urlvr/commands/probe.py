"""`urlvr probe`: before training, how well does each reward agree with correctness on a model's own samples?

For each model: sample `group_size` responses for `num_prompts` prompts once, run one chunked
scoring pass for the union of the token statistics the named rewards declare, score every
sample with every reward, and measure on the labelled prompts (paper §3-4, App. B.2):

- AUROC of reward vs correctness (pooled, and within groups, the ranking GRPO uses);
- Reward Accuracy (Eq. 40) where the reward is 0/1;
- Label Accuracy of the top-reward sample (Eq. 39 for voting, App. B.2's for certainty rewards);
- the majority-correct fraction and the p_maj histogram (Theorem 1's alignment);
- the expected direction of ground truth under training with the reward (docs/probe.md).

Without labels only the label-free quantities are reported (reward spread, p_maj); `urlvr mcs`
measures a prior without labels. The pieces are the trainer's: RunSettings (sampling, extractor,
reward contexts, statistics), the engine registry and the actor's chunked `TokenScorer`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
from urlvr.commands.mcs import _slug
from urlvr.commands.out_dir import check_output_dir, clear_owned
from urlvr.dist import init_distributed
from urlvr.errors import RecipeError
from urlvr.metrics import alignment, dynamics
from urlvr.metrics.plots import plot_probe
from urlvr.progress import JobProgress
from urlvr.recipe import load_recipe
from urlvr.recipe.load import _import_plugins
from urlvr.rewards.base import REWARDS, LabelAccessError, check_reward_kwargs
from urlvr.rewards.compose import RewardError, _prepare, score_batch
from urlvr.rollout.base import ROLLOUT_ENGINES, context_length
from urlvr.rollout.collate import collate_groups
from urlvr.trainer.actor import TokenScorer
from urlvr.trainer.batching import micro_batches, scorer_inputs
from urlvr.trainer.build import (encode_recipe_prompts, load_model_and_tokenizer, seed_everything,
                                 warn_about_budget)
from urlvr.trainer.settings import RunSettings
from urlvr.trainer.stages import Rollout, policy_handle, reward_terms, score_and_reward, scoring_pass


def default_rewards(base: dict[str, Any], origin: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The rewards a probe without `--reward` scores: every registered reward (the recipe's
    plugins included) that applies, and, for each other one, why not. Not probed: oracles (they
    read the label; the probe measures the others against it), rewards whose kwargs are refused
    (defaults, or the base recipe's term), rewards that verify under a time limit (external
    checkers), and rewards whose batch phase asks the policy to generate (found by a dry run on an
    empty batch: the PolicyHandle contract makes every rank call `generate`, even with nothing to
    ask). A reward that raises on the sampled data is dropped later, with its error (`probe_model`)."""
    _import_plugins(base.get("plugins", []), origin or "<dict>")
    own = {t["name"]: t.get("kwargs") or {} for t in base.get("reward", {}).get("terms", [])
           if isinstance(t, dict) and "name" in t}
    names, skipped = [], {}
    for name in REWARDS.names():
        spec, kwargs = REWARDS.get(name), own.get(name, {})
        if spec.needs_label:
            skipped[name] = "an oracle (reads the label): the probe measures the other rewards against it"
            continue
        try:
            check_reward_kwargs(name, kwargs)
        except Exception as err:  # the reward's own message says which kwargs it needs
            skipped[name] = f"its kwargs are refused ({err}); give them in the --recipe's reward.terms"
            continue
        if spec.is_timed(kwargs):
            skipped[name] = ("verifies under a time limit with an external checker (worker processes); "
                             "name it with --reward to probe it")
            continue
        if spec.prepare is not None:
            policy = _DryRunPolicy()
            try:
                _prepare(spec, [], [], policy, kwargs)
            except Exception as err:
                skipped[name] = (f"its batch phase fails on an empty batch ({type(err).__name__}: {err}); "
                                 "name it with --reward to probe it")
                continue
            if policy.asked:
                skipped[name] = ("asks the policy to generate (sampling beyond the probe's own); "
                                 "name it with --reward to probe it")
                continue
        names.append(name)
    return names, skipped


class _DryRunPolicy:
    """A PolicyHandle that records whether it was asked to generate and returns empty texts."""

    asked = False

    def generate(self, questions, *, samples_per_question: int = 1, **_: Any) -> list[list[str]]:
        self.asked = True
        return [[""] * samples_per_question for _ in questions]


@dataclass(frozen=True)
class RewardProbe:
    reward: str
    reward_mean: float
    zero_variance_groups: float  # share of groups where the reward is constant (no GRPO signal)
    auroc: float | None = None  # None: no labels, or one class only
    group_auroc: float | None = None
    reward_accuracy: float | None = None  # 0/1 rewards only
    top_reward_accuracy: float | None = None  # Label Accuracy of the top-reward sample
    advantage_correctness: float | None = None  # mean A_ij c_ij: first-order drift of correctness
    direction: str | None = None  # "rise" | "fall" | "undetermined" (ModelProbe.undetermined says why)
    timeouts: int | None = None  # verifications out of time, scored as wrong; None: the reward has no time limit


@dataclass(frozen=True)
class ModelProbe:
    model: str
    prompts: int
    labelled_prompts: int
    group_size: int
    answer_rate: float  # samples with an extracted answer
    p_maj_mean: float
    sample_accuracy: float | None  # mean correctness of the samples (ground-truth reward)
    majority_correct: float | None  # Label Accuracy of majority vote
    mixed_groups: int = 0  # labelled groups holding both a right and a wrong sample
    undetermined: str | None = None  # why no direction can be drawn from this sample (None: it can)
    p_maj_histogram: dict[str, list] = field(default_factory=dict)
    rewards: tuple[RewardProbe, ...] = ()
    figure: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # reward -> why this probe did not score it
    oracle_timeouts: int | None = None  # the oracle's verifications out of time (scored wrong); None: no time limit


def probe_recipe(base: dict[str, Any], model: str, rewards: Sequence[str], *, group_size: int | None) -> dict[str, Any]:
    """The base recipe (a dict) with this model and one unit-weight term per reward (a term of the
    base recipe keeps its kwargs); nothing is trained, so the other sections only shape sampling."""
    recipe = json.loads(json.dumps(base))  # deep copy of plain data
    own = {t["name"]: t for t in recipe.get("reward", {}).get("terms", []) if isinstance(t, dict)}
    recipe["model"] = {**recipe.get("model", {}), "path": model}
    recipe["reward"] = {**recipe.get("reward", {}), "terms": [
        {"name": name, "kwargs": own.get(name, {}).get("kwargs", {})} for name in rewards]}
    recipe["reward"].pop("vote_group_size", None)
    # the update's knobs (loss, KL, entropy, corrections) act on nothing here, and the on-policy
    # shape forced below would refuse some of them (clip_eps_high needs a ratio): keep the
    # advantage estimator, which the probe measures, and drop the rest
    algorithm = recipe.get("algorithm", {})
    if isinstance(algorithm, dict):
        recipe["algorithm"] = {k: v for k, v in algorithm.items() if k in ("advantage", "advantage_eps")}
    if group_size is not None:
        recipe.setdefault("rollout", {})["group_size"] = group_size
    # nothing is trained: the training batch shape must not refuse the probe (one mini-batch, and
    # micro-batches no larger than it; the scoring pass still cuts them)
    trainer = recipe.setdefault("trainer", {})
    trainer["prompts_per_minibatch"] = trainer.get("prompts_per_step", 64)
    samples = trainer["prompts_per_minibatch"] * recipe.get("rollout", {}).get("group_size", 8)
    if trainer.get("max_tokens_per_micro_batch") is None:  # a token budget cuts micro-batches itself
        trainer["micro_batch_size"] = min(trainer.get("micro_batch_size", 8), samples)
    return recipe


def run_probe(models: Sequence[str], base: dict[str, Any], out_dir: Path | None = None, *,
              rewards: Sequence[str] | None = None, num_prompts: int = 64, group_size: int | None = None,
              overrides: Sequence[str] = (), progress: bool = True, origin: str | None = None,
              overwrite: bool = False) -> list[ModelProbe]:
    """Probe every model with the same prompts and rewards; with `out_dir`, write probe.json,
    probe.csv and `<model>.png` there. `rewards=None`: `default_rewards` (every reward that
    applies; each other one, and any that raises on the sampled data, is listed in each result's
    `skipped`). `origin` names the base recipe's file in error messages. An `out_dir` holding an earlier probe's files (probe.json,
    probe.csv, the PNGs its probe.json names) or a PNG this probe would write is refused
    (RecipeError) before anything loads, unless `overwrite`, which deletes those files once the new
    results are in hand: a PNG of a model this run did not probe must not stay beside its results,
    and a user's own PNG is never touched."""
    terms = [o for o in overrides if o.split("=", 1)[0].strip().startswith("reward.terms")]
    if terms:  # the probe replaces the recipe's terms by its own list, which --set would index silently
        raise RecipeError(f"--set {terms[0]}: urlvr probe scores its own reward terms (--reward), not the recipe's "
                          "reward.terms; give a reward's kwargs in the --recipe file")
    stale: list[Path] = []
    if out_dir is not None:  # refused before any model loads; cleared once the new results are in hand

        out_dir = Path(out_dir)
        taken: set[str] = set()
        owned = [out_dir / "probe.json", out_dir / "probe.csv", *_earlier_figures(out_dir),
                 *(out_dir / f"{_slug(model, taken)}.png" for model in models)]  # the earlier run's, and ours
        stale = check_output_dir(out_dir, owned, overwrite=overwrite, command="probe")
    names, skipped = (list(rewards), {}) if rewards else default_rewards(base, origin)
    optional = () if rewards else names  # a reward the user named raises on bad data; one picked for them is dropped
    results = [probe_model(model, base, names, num_prompts=num_prompts, group_size=group_size, overrides=overrides,
                           progress=progress, origin=origin, optional=optional) for model in models]
    results = [replace(result, skipped={**skipped, **result.skipped}) for result in results]
    if out_dir is not None:
        clear_owned(stale)
        out_dir.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        results = [replace(result, figure=str(plot_probe(result, out_dir / f"{_slug(result.model, taken)}.png")))
                   for result in results]
        write_probe(results, out_dir)
    return results


def probe_model(model: str, base: dict[str, Any], rewards: Sequence[str], *, num_prompts: int = 64,
                group_size: int | None = None, overrides: Sequence[str] = (), progress: bool = True,
                origin: str | None = None, optional: Sequence[str] = ()) -> ModelProbe:
    """One model's probe. A reward in `optional` (picked by `default_rewards`, not named) that
    raises on this data is dropped and listed in `skipped` with its error; any other raises."""
    recipe = load_recipe(probe_recipe(base, model, rewards, group_size=group_size), overrides,
                         origin=f"{origin or '<dict>'} (probing {model})")
    dist = init_distributed()
    settings = RunSettings.derive(recipe, dist)
    seed_everything(settings.seed)
    hf_model, tokenizer = load_model_and_tokenizer(recipe)
    hf_model.to(dist.device).eval()
    records = recipe.data.source.load()[:num_prompts]
    encoded = encode_recipe_prompts(recipe, tokenizer, records, context_length(hf_model))
    records, prompts = list(encoded.records), list(encoded.inputs)
    warn_about_budget(recipe, prompts)  # the scoring pass cuts micro-batches by the budget too
    engine = ROLLOUT_ENGINES.get(recipe.rollout.engine.name).from_recipe(recipe, hf_model, tokenizer, dist)
    groups = _sample(engine, prompts, settings, progress=progress, label=f"urlvr probe: sampling {model}")
    batch = collate_groups(groups, pad_token_id=tokenizer.pad_token_id)
    rollout = Rollout(records, groups, groups, batch, slice(0, batch.input_ids.shape[0]), first_prompt=0)
    skipped: dict[str, str] = {}

    def rewarder(groups, contexts, policy):  # the recipe's terms, one at a time: an optional one may drop out
        return _score_each(groups, contexts, reward_terms(settings), recipe.reward.oracle, policy, optional, skipped)

    # the trainer's scoring and reward stage; the policy handle seeded by the recipe's seed
    scored = score_and_reward(rollout, lambda r: _score(hf_model, r.batch, settings, dist.device),
                              policy_handle(engine, tokenizer, settings, settings.seed), settings, tokenizer,
                              rewarder=rewarder)
    return _measure(model, groups, records, scored, settings, skipped)


def _sample(engine, prompts, settings, *, progress: bool, prompts_per_call: int = 8,
            label: str = "urlvr probe: sampling") -> list:
    """Groups of `rollout.group_size` samples, `prompts_per_call` prompts per engine call (the
    progress unit: a bar on a terminal, a line every 30 s in a log); each prompt seeded by its
    index, so the result does not depend on the chunking."""

    group_size, groups = settings.group_size, []
    sampling = settings.policy_sampling()
    bar = JobProgress(f"{label}, {group_size} samples per prompt", len(prompts), unit="prompts") if progress else None
    try:
        for start in range(0, len(prompts), prompts_per_call):
            chunk = prompts[start : start + prompts_per_call]
            seeds = tuple(settings.sampling_seed(0, start + i) for i in range(len(chunk)))
            groups.extend(engine.generate(chunk, group_size, replace(sampling, prompt_seeds=seeds)))
            if bar:
                bar.advance(len(chunk))
    finally:
        if bar:
            bar.close()
    return groups


@torch.no_grad()
def _score(hf_model, batch, settings, device) -> dict[str, torch.Tensor]:
    """The trainer's scoring pass (`TokenScorer`, chunked over the sequence): exactly the statistics
    the probed rewards declare, on scaled (and, where asked, raw) logits."""
    scorer = TokenScorer(hf_model)
    stats = scoring_pass(micro_batches(batch, range(batch.input_ids.shape[0]), settings.recipe.trainer), lambda micro:
                         scorer(**scorer_inputs(micro, device), temperature=settings.temperature,
                                stats=settings.score_stats, raw_stats=settings.raw_score_stats), batch)
    return {name: value.cpu() for name, value in stats.items()}


def _measure(model: str, groups, records, scored, settings, skipped: dict[str, str]) -> ModelProbe:
    recipe, size, contexts = settings.recipe, settings.group_size, scored.contexts
    scored = scored.rewards
    answers = [ctx.answers for ctx in contexts]
    p_maj = dynamics.majority_ratios(answers)  # [B]
    labels = [r.label for r in records]
    oracle = scored.oracle  # [B, G], NaN rows unlabelled; None without an oracle or labels
    majority_correct = dynamics.majority_correctness(answers, answers, oracle, labels) if oracle is not None else None
    labelled = ~torch.isnan(oracle).any(dim=1) if oracle is not None else torch.zeros(len(groups), dtype=torch.bool)
    correct = (oracle[labelled] > 0.5).double() if bool(labelled.any()) else None  # [M, G]
    estimator = ADVANTAGE_ESTIMATORS.get(recipe.algorithm.advantage)
    answer_rate = sum(a is not None for group in answers for a in group) / (len(groups) * size)
    mixed = alignment.mixed_groups(correct) if correct is not None else 0
    undetermined = alignment.undetermined_reason(int(labelled.sum()), answer_rate, mixed)
    per_reward = []
    for name, scores in scored.per_term.items():  # [B, G] each
        std = scores.std(dim=1, unbiased=False) if size > 1 else torch.zeros(len(groups))
        probe = RewardProbe(reward=name, reward_mean=float(scores.mean()),
                            zero_variance_groups=float((std == 0).double().mean()), timeouts=scored.timeouts.get(name))
        if correct is not None:
            mine = scores[labelled].double()
            top = float(correct.gather(1, mine.argmax(dim=1, keepdim=True)).mean())  # ties: the first sample
            advantages = estimator(mine, eps=recipe.algorithm.advantage_eps)
            probe = replace(
                probe, auroc=alignment.auroc(mine, correct), group_auroc=alignment.group_auroc(mine, correct),
                reward_accuracy=float(((mine > 0.5).double() == correct).double().mean())
                if alignment.is_binary(mine) else None,
                top_reward_accuracy=top, advantage_correctness=alignment.advantage_correctness(advantages, correct),
                direction="undetermined" if undetermined else alignment.expected_direction(top))
        per_reward.append(probe)
    return ModelProbe(
        model=model, prompts=len(groups), labelled_prompts=int(labelled.sum()), group_size=size,
        answer_rate=answer_rate,
        p_maj_mean=float(p_maj.mean()), sample_accuracy=float(correct.mean()) if correct is not None else None,
        majority_correct=float(majority_correct[labelled].mean()) if correct is not None else None,
        mixed_groups=mixed, undetermined=undetermined if correct is not None else None,
        p_maj_histogram=alignment.p_maj_histogram(p_maj, majority_correct if correct is not None else None, size),
        rewards=tuple(per_reward), skipped=skipped, oracle_timeouts=scored.timeouts.get("oracle"))


def _score_each(groups, contexts, terms, oracle, policy, optional: Sequence[str], skipped: dict[str, str]):
    """`score_batch`, one term at a time, so that a term in `optional` that raises on this data
    (e.g. `countdown` on problems without its numbers) is dropped, with its error written into
    `skipped` ({reward: why dropped}), instead of stopping the probe. -> BatchRewards of the kept
    terms and the oracle."""
    per_term, timeouts = {}, {}
    for term in terms:
        try:
            one = score_batch(groups, contexts, [term], None, policy)
        except (RewardError, LabelAccessError) as err:
            # a default pick that breaks on this data (or reads the label it may not) must not
            # stop the probe of every other reward; a reward the user named still raises
            if term.name not in optional:
                raise
            cause = err.__cause__ or err
            skipped[term.name] = f"raised on this data ({type(cause).__name__}: {cause})"
            continue
        per_term.update(one.per_term)
        timeouts.update(one.timeouts)
    scored = score_batch(groups, contexts, [], oracle, policy)
    return replace(scored, per_term=per_term, timeouts={**timeouts, **scored.timeouts})


# --------------------------------------------------------------------------- reporting
COLUMNS = ("model", "reward", "auroc", "group_auroc", "reward_accuracy", "top_reward_accuracy",
           "sample_accuracy", "majority_correct", "advantage_correctness", "direction")


def rows(results: Sequence[ModelProbe]) -> list[dict[str, Any]]:
    """One flat row per (model, reward): the CSV's and the table's content."""
    out = []
    for result in results:
        shared = {k: v for k, v in asdict(result).items() if k not in ("rewards", "p_maj_histogram", "figure", "skipped")}
        for reward in result.rewards:
            out.append({**shared, **asdict(reward)})
    return out


def _earlier_figures(out_dir: Path) -> list[Path]:
    """The PNGs an earlier probe wrote into `out_dir`: the `figure` of each model its probe.json
    lists (none when there is no readable probe.json)."""
    try:
        saved = json.loads((out_dir / "probe.json").read_text())
    except (OSError, ValueError):
        return []
    figures = [m.get("figure") for m in saved if isinstance(m, dict)] if isinstance(saved, list) else []
    return [out_dir / Path(f).name for f in figures if isinstance(f, str) and f.endswith(".png")]


def ranked(result: ModelProbe) -> list:
    """The model's rewards best first (`alignment.rank_rewards`: top-reward acc, then AUROC in group)."""
    return alignment.rank_rewards(result.rewards, result.labelled_prompts, result.undetermined)


def write_probe(results: Sequence[ModelProbe], out_dir: Path) -> None:
    (out_dir / "probe.json").write_text(json.dumps([{**asdict(r), "ranked": [asdict(e) for e in ranked(r)]}
                                                    for r in results], indent=2))
    flat = rows(results)
    with open(out_dir / "probe.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["model"])
        writer.writeheader()
        writer.writerows(flat)


def print_table(results: Sequence[ModelProbe], *, rank: bool = False) -> None:
    """A rich table, one row per (model, reward); label-free columns only where no labels exist.
    `rank`: one table per model instead, its rewards best first (`ranked`), with the rule."""
    if rank:
        _print_ranked(results)
        return
    labelled = any(r.labelled_prompts for r in results)
    columns = COLUMNS if labelled else ("model", "reward", "reward_mean", "zero_variance_groups", "p_maj_mean")
    table = Table(title="urlvr probe" + ("" if labelled else " (no labels: label-free quantities only)"))
    table_rows = [[_cell(row.get(c)) if c != "model" else _short(row[c]) for c in columns] for row in rows(results)]
    for index, column in enumerate(columns):
        named = column in ("model", "reward", "direction")
        # names are never cut: two rows `urlvr/ti…` could not be told apart; numbers wrap their header instead
        width = max([len(r[index]) for r in table_rows], default=0) if named else None
        table.add_column(HEADERS.get(column, column), justify="left" if named else "right", min_width=width,
                         no_wrap=named)
    for cells in table_rows:
        table.add_row(*cells)
    # wide enough for every column's widest cell (the console would squeeze the names otherwise)
    needed = sum(max([len(HEADERS.get(c, c)) if c not in ("model", "reward", "direction") else 0,
                      *(len(r[i]) for r in table_rows)]) + 3 for i, c in enumerate(columns)) + 4
    console = Console(width=max(Console().width, 120, needed))
    console.print(table)
    late = sum(r.oracle_timeouts or 0 for r in results) + sum(p.timeouts or 0 for r in results for p in r.rewards)
    if late:
        console.print(f"urlvr: {late} verifications ran out of time and were scored as wrong (columns `timeouts`, "
                      "`oracle_timeouts` of probe.csv); raise the reward's timeout_s / budget_s to measure them")
    if not labelled:
        console.print("urlvr: no labelled prompts; to measure a prior without labels, run `urlvr mcs`")
    _print_notes(console, results)


def _print_notes(console, results: Sequence[ModelProbe]) -> None:
    """The lines under a table: why a model's direction is undetermined, and the rewards not probed."""
    for result in results:
        if result.undetermined:
            console.print(f"urlvr: {result.model}: direction undetermined: {result.undetermined}")
    shared = {k: v for k, v in results[0].skipped.items() if all(r.skipped.get(k) == v for r in results)} if results else {}
    for name, why in shared.items():
        console.print(f"urlvr: not probed: {name}: {why}", soft_wrap=True)
    for result in results:
        for name, why in result.skipped.items():
            if name not in shared:
                console.print(f"urlvr: {result.model}: not probed: {name}: {why}", soft_wrap=True)


RANK_RULE = ("ranked by top-reward acc (the share of prompts whose highest-scored sample is right), ties by AUROC "
             "in group. Rule (paper Theorem 1, App. A.4-A.5): training concentrates each prompt on the answer the "
             "reward ranks first, so expect `rise` where that answer is right on more than half the prompts. "
             "Limits: it predicts the first direction only (every intrinsic reward falls in the end, paper §4.1); "
             "rewards within about 2 standard errors (± column) are not told apart; on the tiny models `rise` "
             "was necessary, not sufficient, for a gain (docs/probe.md)")


def _print_ranked(results: Sequence[ModelProbe]) -> None:
    console = Console(width=max(Console().width, 120))
    for result in results:
        table = Table(title=f"urlvr probe --rank: {result.model} ({result.labelled_prompts} labelled prompts)")
        for column in ("rank", "reward", "top-reward acc", "±", "AUROC in group", "direction", "why undetermined"):
            named = column in ("reward", "direction", "why undetermined")
            table.add_column(column, justify="left" if named else "right", no_wrap=column != "why undetermined")
        for entry in ranked(result):
            table.add_row(_cell(entry.rank), entry.reward, _cell(entry.top_reward_accuracy),
                          _cell(entry.standard_error), _cell(entry.group_auroc), _cell(entry.direction),
                          "see below" if entry.reason and entry.reason == result.undetermined
                          else entry.reason or "")
        console.print(table)
    console.print(f"urlvr: {RANK_RULE}", soft_wrap=True)
    _print_notes(console, results)


HEADERS = {"auroc": "AUROC", "group_auroc": "AUROC in group", "reward_accuracy": "reward acc", "top_reward_accuracy":
           "top-reward acc", "sample_accuracy": "sample acc", "majority_correct": "maj right",
           "advantage_correctness": "adv x correct", "reward_mean": "mean reward",
           "zero_variance_groups": "flat groups", "p_maj_mean": "p_maj"}


def _short(model: str) -> str:
    """The last two path parts of a model directory (hub ids and aliases are short already)."""
    parts = Path(model).parts
    return model if len(parts) <= 2 else str(Path(*parts[-2:]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
