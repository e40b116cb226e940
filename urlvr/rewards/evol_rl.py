"""EVOL-RL (Zhou et al., arXiv 2509.15194): the majority answer as anchor, novelty as variation.

Each sample with an answer is "in" (its answer is the group's majority) or "out". Its novelty
u_i = 1 - (alpha * mean_sim_i + (1 - alpha) * max_sim_i) compares its text embedding with its
siblings': mean_sim over the valid samples on its own side (in with in, out with out), max_sim
over every other valid sample; cosine similarities are clipped to [0, 1]. Novelty is min-max
normalised within each side to u~ in [0, 1], and the reward keeps the two sides apart:
in -> 0.5 + 0.5 u~ in [0.5, 1], out -> -1 + 0.5 u~ in [-1, -0.5], no answer -> -1.
So majority always outranks minority (selection) and, within a side, the response whose
reasoning differs most from its siblings' ranks highest (variation).

The embedding is pluggable (`EMBEDDERS`, below): `wordllama` (default) is WordLlama's
l2_supercat 256-d static token embeddings, shipped inside the `wordllama` wheel, so it runs on
CPU with no hub download (pip install 'urlvr[evol]'); `tfidf` is a dependency-free fallback
(word TF-IDF within the group). The paper's embedder (Qwen3-Embedding-4B served by vLLM) is not
bundled: register it under a name of your own. Either way the policy runs no extra forward
pass; the embedder runs once per step over the group's texts.

Choices where the paper is silent, following its code (YujunZhou/EVOL-RL,
`semantic_novelty.py`), so they can be tested (docs/rewards.md, "EVOL-RL"):
  * alpha = 0.5; the text embedded is what follows `</think>` when present, else the response;
  * a side of one sample: u~ = 1 (in -> 1.0, out -> -0.5); a side whose novelties are all
    equal: u~ = 0.5 (0.75 and -0.75); a sample alone on its side uses the mean over all other
    valid samples;
  * differs from the code where the code degenerates: a sample that is the only valid one gets
    u~ = 1 as well (the code gives it -1), and a group of one sample follows the same rule
    (the code returns the plain vote, 1 or 0).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

from urlvr.registry import Registry
from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.algorithms.voting import majority_answers
from urlvr.rollout.base import Group

Embedder = Callable[[Sequence[str]], torch.Tensor]  # texts -> [N, D]
EMBEDDERS: Registry[Embedder] = Registry("embedder")
EVOL_INSTALL = "pip install 'urlvr[evol]'"


@cache
def _wordllama():
    """WordLlama from the files inside its wheel. `WordLlama.load()` itself looks for the
    tokenizer under `tokenizer/` while the wheel ships it under `tokenizers/`, and then tries the
    hub; loading the two files directly keeps it offline."""
    import wordllama  # optional extra (urlvr[evol]), loaded on demand: only the wordllama embedder needs it
    from safetensors import safe_open  # comes with transformers; only this embedder reads a raw table
    from wordllama import WordLlama  # optional extra, as above
    from wordllama.inference import WordLlamaInference  # optional extra, as above

    root = Path(wordllama.__file__).parent
    tokenizer = WordLlama.load_tokenizer(root / "tokenizers" / "l2_supercat_tokenizer_config.json")
    with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np", device="cpu") as f:
        table = f.get_tensor("embedding.weight")
    return WordLlamaInference(table, tokenizer)


@EMBEDDERS.register("wordllama")
def wordllama_embed(texts: Sequence[str]) -> torch.Tensor:
    """WordLlama l2_supercat, 256 dimensions (needs pip install 'urlvr[evol]').  -> [N, 256]."""
    if not texts:
        return torch.zeros(0, 256, dtype=torch.float64)
    return torch.as_tensor(_wordllama().embed(list(texts)), dtype=torch.float64)


_WORD = re.compile(r"\w+", re.UNICODE)


@EMBEDDERS.register("tfidf")
def tfidf_embed(texts: Sequence[str]) -> torch.Tensor:
    """Word TF-IDF over the group: tf * (log((1 + N) / (1 + df)) + 1), scikit-learn's smoothed
    idf, on lower-cased \\w+ words (single characters kept: digits matter in math).  -> [N, V]."""
    docs = [Counter(_WORD.findall(t.lower())) for t in texts]
    vocab = sorted({w for d in docs for w in d})
    if not vocab:
        return torch.zeros(len(texts), 1, dtype=torch.float64)
    index = {w: k for k, w in enumerate(vocab)}
    df = Counter(w for d in docs for w in d)
    out = torch.zeros(len(texts), len(vocab), dtype=torch.float64)
    for row, doc in enumerate(docs):
        for word, count in doc.items():
            out[row, index[word]] = count * (math.log((1 + len(texts)) / (1 + df[word])) + 1)
    return out


def cosine_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """clip(cos(e_i, e_j), 0, 1); a zero vector has similarity 0 to everything.  [N, D] -> [N, N] float64."""
    e = embeddings.to(torch.float64)
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    sim = e @ e.T
    return ((sim + sim.T) / 2).clamp(0.0, 1.0)  # exactly symmetric: equal pairs give equal novelty


_EQUAL = 1e-12  # novelties closer than this are equal: min-max would blow float noise up to [0, 1]


def novelty_rewards(inside: Sequence[bool | None], sim: torch.Tensor, alpha: float = 0.5) -> list[float]:
    """EVOL-RL's reward from the side of each sample (True: majority, False: not, None: no
    answer) and the [N, N] similarity of the samples (rows of the None ones are ignored)."""
    valid = [i for i, side in enumerate(inside) if side is not None]
    novelty: dict[int, float] = {}
    for i in valid:
        others = [j for j in valid if j != i]
        same = [j for j in others if inside[j] == inside[i]]
        if not others:
            continue  # the only valid sample: no sibling to differ from (u~ = 1 below)
        mean_sim = float(sim[i, same or others].mean())
        max_sim = float(sim[i, others].max())
        novelty[i] = 1.0 - (alpha * mean_sim + (1.0 - alpha) * max_sim)
    scores = [-1.0] * len(inside)
    for side, base in ((True, 0.5), (False, -1.0)):
        members = [i for i in valid if inside[i] == side]
        values = [novelty[i] for i in members if i in novelty]
        lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
        for i in members:
            if len(members) == 1:
                scaled = 1.0
            elif hi - lo > _EQUAL:
                scaled = (novelty[i] - lo) / (hi - lo)
            else:
                scaled = 0.5
            scores[i] = base + 0.5 * scaled
    return scores


def _reasoning_text(text: str) -> str:
    cut = text.find("</think>")
    return text[cut + len("</think>"):].strip() if cut != -1 else text


@reward("evol_rl", family="certainty")
def evol_rl(group: Group, ctx: RewardContext, *, embedding: str = "wordllama", alpha: float = 0.5) -> RewardOutput:
    """EVOL-RL: r_i = 1[a_i=maj](0.5 + 0.5 u~_i) + 1[a_i!=maj](-1 + 0.5 u~_i), u_i = 1 - (alpha mean_sim_i + (1-alpha) max_sim_i)  (arXiv 2509.15194, Method: novelty-aware reward).

    A sample without an answer scores -1; u~ is u min-max normalised within its side.

    `embedding` names a registered embedder (EMBEDDERS: `wordllama`, `tfidf`, or a plugin's);
    `alpha` weighs the mean against the max similarity (0.5, the code's). The majority is TTRL's
    (`ctx.voters`, ties to the first seen, samples without an answer abstain).
    """
    winners = majority_answers(ctx.voters)
    inside = [None if a is None else a in winners for a in ctx.answers]
    valid = [i for i, side in enumerate(inside) if side is not None]
    sim = torch.zeros(len(inside), len(inside), dtype=torch.float64)
    if len(valid) > 1:
        vectors = EMBEDDERS.get(embedding)([_reasoning_text(group.samples[i].text) for i in valid])
        sim[torch.tensor(valid).unsqueeze(1), torch.tensor(valid).unsqueeze(0)] = cosine_matrix(vectors)
    scores = novelty_rewards(inside, sim, alpha)
    return RewardOutput(scores=scores, diagnostics={"in_majority": [float(bool(s)) for s in inside]})


def _check(*, embedding: str = "wordllama", alpha: float = 0.5) -> None:
    if embedding not in EMBEDDERS:  # an unknown name lists the known ones
        raise ValueError(f"evol_rl: embedding: {EMBEDDERS.unknown_name_message(embedding)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"evol_rl: alpha must lie in [0, 1], got {alpha}")
    if embedding == "wordllama":
        try:
            import wordllama  # noqa: F401
        except ImportError:
            raise ValueError(f"evol_rl: embedding 'wordllama' needs the wordllama package: {EVOL_INSTALL} "
                             "(or embedding: tfidf, no dependency)") from None


def check_group(*, group_size: int, vote_group_size: int | None, **kwargs: object) -> None:
    """The load-time check against `rollout.group_size`: with two trained samples each side's
    novelties are equal or the side is one sample, so the scores are fixed by the sides alone
    (0.75 each, or 1.0 and -0.5) and the embedder and alpha would do nothing."""
    idle = [k for k in ("embedding", "alpha") if k in kwargs]
    if idle and group_size <= 2:
        raise ValueError(f"evol_rl: {' and '.join(idle)} {'shape' if len(idle) > 1 else 'shapes'} the novelty, and with rollout.group_size "
                         f"{group_size} the novelty cannot rank anything (each side's samples score alike): "
                         f"drop {'them' if len(idle) > 1 else 'it'} or train 3 or more samples per prompt")


evol_rl.check = _check  # type: ignore[attr-defined]
evol_rl.check_group = check_group  # type: ignore[attr-defined]
