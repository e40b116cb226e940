"""Where each step's rollout comes from: sampled when the step needs it, or requested up to
`trainer.max_staleness` steps ahead from an engine that samples apart from the trainer.

Policy versions count weight syncs: version v is the policy after v GRPO steps (version 0 the
starting weights), so step t updates policy t-1 into policy t and pushes version t when done.
With staleness k, the request for step s is sent at the start of step s-k, when the engine
serves version s-k-1: a sample trained at step s is at most k versions old, and exactly k in
the steady state. k = 0 asks for step s at step s, the on-policy algorithm; every request's
prompts, seeds and sampling are those the synchronous loop uses, so k = 0 samples the same
groups and trains bit-identically (tests/test_async.py).

Resume: a checkpoint after step t first waits for the rollouts in flight (steps t+1..t+k) and
stores them with the checkpoint (`inflight.pt`), global and in prompt order, so a resume on any
number of ranks trains exactly the samples the uninterrupted run would have, and the prompt
stream's position already counts their prompts: none is lost or drawn twice. A stored rollout
that the resumed run may not train (a smaller `max_staleness`, or a colocated engine now) is
sampled again from its same prompts and seeds by the current policy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from urlvr.data.records import PromptRecord
from urlvr.data.stream import PromptStream
from urlvr.dist import DistInfo, all_gather_objects, even_shard
from urlvr.errors import GenerationServerError
from urlvr.rollout.base import Group, PromptInput, RolloutEngine
from urlvr.trainer.settings import RunSettings


@dataclass
class Pending:
    """A step's rollout asked for ahead of its step: this rank's prompts, the version it was asked
    of, the engine's ticket until it is collected, then its voting groups."""

    step: int
    records: list[PromptRecord]
    version: int
    ticket: int | None = None
    drawn: list[Group] | None = None
    waited_s: float = 0.0
    server_idle_s: float = 0.0
    generate_s: float = 0.0


@dataclass
class StepRollout:
    records: list[PromptRecord]  # this rank's prompts
    drawn: list[Group]  # their voting groups
    metrics: dict[str, float] = field(default_factory=dict)  # async/*, global


class RolloutProducer:
    """Hands each step its prompts and voting groups; owns the policy version and the in-flight
    requests. Every rank calls `rollout` and `sync` at every step (both are collective)."""

    def __init__(self, engine: RolloutEngine, stream: PromptStream, prompts: dict[str, PromptInput],
                 settings: RunSettings, generation_context: Callable, total_steps: int, dist: DistInfo) -> None:
        self.engine, self.stream, self.prompts, self.settings = engine, stream, prompts, settings
        self.generation_context, self.total_steps, self.dist = generation_context, total_steps, dist
        self.max_staleness = settings.recipe.trainer.max_staleness
        self.overlaps = bool(getattr(engine.settings, "overlaps_training", False))
        self.pending: deque[Pending] = deque()

    # ------------------------------------------------------------------ every step
    def rollout(self, step: int) -> StepRollout:
        """Step `step`'s prompts and voting groups; with an overlapping engine, first send the
        requests for steps up to `step + max_staleness`."""
        if not self.overlaps:
            pending = self._take(step)
            records = pending.records if pending else self.stream.next_batch()
            return StepRollout(records, self._generate_now(step, records))
        while (self.pending[-1].step if self.pending else step - 1) < min(step + self.max_staleness, self.total_steps):
            self._request(self.pending[-1].step + 1 if self.pending else step, self.stream.next_batch(), step - 1)
        pending = self._take(step)
        if pending.drawn is None:
            self._collect(pending)
        staleness = [step - 1 - group.policy_version for group in pending.drawn]
        if staleness and (max(staleness) > self.max_staleness or min(staleness) < 0):
            raise GenerationServerError(f"step {step}: a rollout of policy version {step - 1 - max(staleness)} for a "
                                        f"trainer at version {step - 1} with max_staleness {self.max_staleness}")
        times = all_gather_objects([(pending.waited_s, pending.server_idle_s, pending.generate_s)])
        metrics = {"async/staleness_mean": sum(staleness) / max(len(staleness), 1),
                   "async/staleness_max": float(max(staleness, default=0)),
                   "async/rollout_wait_s": max(w for w, _, _ in times),
                   "async/server_idle_s": max(i for _, i, _ in times),
                   "async/server_generate_s": sum(g for _, _, g in times),  # every rank's request, one after another
                   "async/in_flight": float(len(self.pending))}
        return StepRollout(pending.records, pending.drawn, metrics)

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """After step `version`'s update (or at a resume from that step's checkpoint): the engine
        samples `model` from now on, as policy `version`."""
        if self.overlaps:
            self.engine.push_weights(model, version)
        else:
            self.engine.sync_weights(model)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> list[dict]:
        """The rollouts in flight, collected (the wait is the checkpoint's only stall), global and in
        prompt order: [{step, records, drawn}]. Collective."""
        for pending in self.pending:
            if pending.drawn is None:
                self._collect(pending)
        mine = [(p.step, p.records, p.drawn) for p in self.pending]
        by_rank = all_gather_objects([mine])
        return [{"step": step, "records": [r for rank in by_rank for r in rank[i][1]],
                 "drawn": [g for rank in by_rank for g in rank[i][2]]}
                for i, (step, _, _) in enumerate(by_rank[0])]

    def load_state_dict(self, stored: list[dict]) -> None:
        """Take back this rank's share of each stored rollout (the stream's `even_shard`)."""
        self.pending.clear()
        for entry in stored:
            share = even_shard(len(entry["records"]), self.dist.world_size, self.dist.rank)
            records, drawn = entry["records"][share.start:share.stop], entry["drawn"][share.start:share.stop]
            version = min((g.policy_version for g in drawn if g.policy_version is not None), default=None)
            self.pending.append(Pending(entry["step"], records, -1 if version is None else version, drawn=drawn))

    # ------------------------------------------------------------------ helpers
    def _take(self, step: int) -> Pending | None:
        """The pending rollout of `step`, or None. A stored one the run may not train as it is (too
        stale now, or no version: asked of another engine) keeps its prompts and is sampled again."""
        if not self.pending:
            return None
        pending = self.pending.popleft()
        if pending.step != step:  # a bug, never a silent skip of prompts
            raise RuntimeError(f"the rollout in flight is for step {pending.step}, the trainer is at step {step}")
        if pending.drawn is not None and (not self.overlaps or step - 1 - pending.version > self.max_staleness):
            if self.overlaps:
                self._request(step, pending.records, step - 1, front=True)
                return self.pending.popleft()
            pending.drawn = None
        return pending

    def _request(self, step: int, records: list[PromptRecord], version: int, front: bool = False) -> None:
        sampling = self.settings.train_sampling(step, len(records))
        ticket = self.engine.submit([self.prompts[r.prompt_id] for r in records], self.settings.vote_group_size,
                                    sampling, version)
        pending = Pending(step, records, version, ticket)
        self.pending.appendleft(pending) if front else self.pending.append(pending)

    def _collect(self, pending: Pending) -> None:
        served = self.engine.collect(pending.ticket)
        pending.drawn, pending.waited_s = served.groups, served.waited_s
        pending.server_idle_s, pending.generate_s = served.server_idle_s, served.generate_s

    def _generate_now(self, step: int, records: list[PromptRecord]) -> list[Group]:
        with self.generation_context():
            return self.engine.generate([self.prompts[r.prompt_id] for r in records], self.settings.vote_group_size,
                                        self.settings.train_sampling(step, len(records)))
