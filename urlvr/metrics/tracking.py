"""Per-prompt tracking (paper Fig. 4): how each chosen prompt's answers evolve over training.

Two kinds of rows go to `prompts.jsonl` in the run directory:
  * `kind: "rollout"` -- every step, for each tracked prompt that was in the step's batch: p_maj,
    the majority answer, whether it is right, the mean ground-truth and proxy reward, and whether
    the highest-reward sample is right (the paper's green square wave). No extra compute.
  * `kind: "greedy"` -- every `dynamics.greedy_every` steps (and before step 1), one greedy
    decode of every tracked prompt: its answer, correctness and confidence (the geometric mean
    token probability, the heatmap's colour depth).
Fields that need a label are null for unlabelled prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from urlvr.algorithms.voting import majority_answer
from urlvr.data.records import PromptRecord
from urlvr.metrics.loggers import open_for_append, read_jsonl


def rollout_rows(
    step: int, records: Sequence[PromptRecord], voters: Sequence[Sequence[str | None]], p_maj: torch.Tensor,
    majority_correct: torch.Tensor, proxy: torch.Tensor, oracle: torch.Tensor | None,
    tracked: Sequence[str] | str | None,
) -> list[dict[str, Any]]:
    """One row per tracked prompt of this rank's batch. p_maj, majority_correct: [B]; proxy, oracle: [B, G]."""
    wanted = None if tracked == "all" else set(tracked or ())
    rows = []
    for i, record in enumerate(records):
        if wanted is not None and record.prompt_id not in wanted:
            continue
        labelled = oracle is not None and not bool(torch.isnan(oracle[i]).any())
        top = int(proxy[i].argmax())
        rows.append({
            "step": step, "kind": "rollout", "prompt_id": record.prompt_id,
            "p_maj": float(p_maj[i]), "majority_answer": majority_answer(voters[i]),
            "majority_correct": bool(majority_correct[i]) if labelled else None,
            "ground_truth_mean": float(oracle[i].mean()) if labelled else None,
            "proxy_mean": float(proxy[i].mean()),
            "top_reward_correct": bool(oracle[i, top] > 0.5) if labelled else None,
        })
    return rows


def greedy_row(step: int, prompt_id: str, sample, answer: str | None, correct: bool | None) -> dict[str, Any]:
    """One `kind: greedy` row: the greedy answer, its correctness (None without a label, or when
    its verification ran out of time) and the model's confidence exp(mean log-prob) of its own
    greedy response."""
    mean_logprob = sum(sample.logprobs) / len(sample.logprobs) if sample.logprobs else 0.0
    return {"step": step, "kind": "greedy", "prompt_id": prompt_id, "answer": answer,
            "correct": correct, "confidence": math.exp(mean_logprob), "length": len(sample.token_ids)}


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, in rank order, on every rank (a no-op in a world of one)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return rows
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, rows)
    return [row for part in everyone for row in part]


class PromptTrackWriter:
    """Appends rows to `prompts.jsonl` (a registered per-step file: resume truncates it)."""

    def __init__(self, path: Path) -> None:
        self.file = open_for_append(path)

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self.file.writelines(json.dumps(row) + "\n" for row in rows)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_prompt_rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "prompts.jsonl")
