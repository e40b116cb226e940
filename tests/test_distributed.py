"""Two CPU processes (gloo) train exactly like one: ZeRO-2 and ZeRO-3 under each of torchrun and
the deepspeed launcher, ZeRO-3 under `accelerate launch`, a ZeRO-2 run split by a checkpoint
and `--resume`, batches that two ranks do not divide (3 prompts per step, 1 prompt per
mini-batch), two "nodes" (two `torchrun --nnodes 2` invocations on this machine), and resuming
on another number of processes (ZeRO-0/1/2; ZeRO-3 refused with its remedy).

Why the runs can be compared at all: the rollout seed of a prompt depends on (recipe seed, step,
the prompt's index in the global batch), not on the rank, so one process and two sample the
same responses; the token-mean loss is normalised by the global token count, so the summed
gradients match. Every run is shared by the assertions through module-scoped fixtures.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import urlvr
from conftest import process_alive, small_run_recipe
from urlvr.dist import free_port

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
STEPS = 4
PROMPTS_PER_STEP, GROUP_SIZE, WORLD = 4, 4, 2
BUDGET = 12.0  # test_short_response's default budget: reward = 1 - length / 12
# float-noise diagnostics whose values depend on batch shapes, not on the maths being compared
# perf/padding_fraction and perf/tokens_per_forward describe how each rank's micro-batches were
# cut (trimmed to their own rows): they depend on the split over ranks by design
VOLATILE = ("time/", "perf/tokens_per_second", "perf/padding_fraction", "perf/tokens_per_forward",
            "rollout/logprob_mismatch", "rollout/mismatch_kl")
WEIGHT_ATOL, METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-4, 1e-6
TWO_PROCESS_RUNS = {  # run name -> (launcher, ZeRO stage)
    "zero2": ("torchrun", 2), "zero3": ("deepspeed", 3), "zero3_torchrun": ("torchrun", 3),
    "zero2_deepspeed": ("deepspeed", 2), "zero3_accelerate": ("accelerate", 3),
}


# batches that two ranks do not divide: run name -> (launcher, ZeRO stage, trainer settings), group size 3.
# Prompts split 2/1 per step; each mini-batch's rows split 5/4 (3 prompts) or 2/1 (1 prompt), so
# the rank with fewer rows runs filler micro-batches, in the scoring pass and in the update
UNEVEN_GROUP_SIZE = 3
UNEVEN_RUNS = {
    "three_prompts": ("torchrun", 3, {"prompts_per_step": 3, "prompts_per_minibatch": 3, "micro_batch_size": 2}),
    "one_prompt_minibatch": ("deepspeed", 2, {"prompts_per_step": 3, "prompts_per_minibatch": 1, "micro_batch_size": 1}),
}


def recipe_for(model_path: Path, out: Path, zero_stage: int, *, group_size: int = GROUP_SIZE,
               trainer: dict | None = None) -> dict:
    return small_run_recipe(
        model_path, out, plugins=["reward_plugins"],
        reward={"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"},
        # stopping on the digits 0-4 spreads response lengths, so most groups carry a gradient
        rollout={"group_size": group_size, "max_new_tokens": int(BUDGET), "stop_token_ids": [3, 4, 5, 6, 7]},
        trainer={"total_steps": STEPS, "prompts_per_step": PROMPTS_PER_STEP, "prompts_per_minibatch": PROMPTS_PER_STEP,
                 "micro_batch_size": 8, "save_every": 0, **(trainer or {})},
        # A large Adam eps keeps each update linear in the gradient. With the default, the first
        # steps are lr x sign(g): ZeRO-3's reduce-scatter sums in another order, and in an element
        # whose gradient is float noise that order picked the sign of a full lr step (one v_proj
        # element 4.9e-5 apart after the inverse-CDF sampler of 14abf5d changed the samples).
        optim={"lr": 1e-3, "adam_eps": 1e-2, "deepspeed": {"zero_stage": zero_stage}},
        # KL to pi_0 (a frozen reference per rank) and per-prompt tracking (rows gathered from every rank)
        dynamics={"kl_to_initial_every": 2, "track_prompts": "all", "greedy_every": 2},
    )


def launch(launcher: str, args: list[str], work: Path, name: str, timeout: float = 300) -> Path:
    """Run `urlvr <args>` on two ranks in a clean environment; returns the log (checked for exit 0).
    `launcher`: torchrun, deepspeed, accelerate, `nodes` (two torchrun invocations, --nnodes 2,
    one process each: two "nodes" on this machine) or `none` (one process, no launcher)."""
    port = str(free_port())
    if launcher == "torchrun":
        cmds = [[str(VENV_BIN / "torchrun"), "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                 "--master_port", port, "-m", "urlvr.cli", *args]]
    elif launcher == "nodes":  # what each node of a cluster runs, with its own --node_rank
        cmds = [[str(VENV_BIN / "torchrun"), "--nnodes", str(WORLD), "--nproc_per_node", "1", "--node_rank", str(node),
                 "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name,
                 "-m", "urlvr.cli", *args] for node in range(WORLD)]
    elif launcher == "accelerate":  # --multi_gpu is accelerate's torch-elastic launcher, gloo ranks on a CPU
        # box; its --cpu would start ONE process (multi-CPU needs MPI), silently: the seen-groups check catches it
        cmds = [[str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
                 "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "urlvr.cli", *args]]
    elif launcher == "none":
        cmds = [[sys.executable, "-m", "urlvr.cli", *args]]
    else:  # the deepspeed launcher inserts --local_rank=N after the module name
        cmds = [[str(VENV_BIN / "deepspeed"), "--num_gpus", str(WORLD), "--master_port", port,
                 "--module", "urlvr.cli", *args]]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a small CPU box: no oversubscription
    seen = work / f"{name}-seen"
    seen.mkdir(exist_ok=True)
    env["URLVR_TEST_SEEN_GROUPS_DIR"] = str(seen)
    log = work / f"{name}.log"
    with open(log, "w") as out:
        procs = [subprocess.Popen(cmd, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                 for cmd in cmds]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session: it and its ranks
                proc.wait()
                codes.append("timeout")
    assert codes == [0] * len(cmds), f"{cmds} -> {codes}\n--- {log} ---\n{log.read_text()[-6000:]}"
    # DeepSpeed's CPU shared-memory all-reduce names its per-rank segments after the master port
    # and never unlinks them (urlvr.dist): a run that built it would leave RAM behind in /dev/shm
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"{name} left shared memory behind: {[p.name for p in leaked]}"
    return log


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def seen_by_rank(seen_dir: Path) -> dict[int, list[dict]]:
    return {rank: [json.loads(line) for line in (seen_dir / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in range(WORLD)}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a), "a weight was exported partitioned (ZeRO-3 shards?)"
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_metrics_close(expected: list[dict], actual: list[dict], context: str) -> None:
    assert [m["step"] for m in actual] == [m["step"] for m in expected], context
    for want, got in zip(expected, actual):
        keys = {k for k in want if not k.startswith(VOLATILE)}
        assert keys == {k for k in got if not k.startswith(VOLATILE)}, context
        bad = {k: (want[k], got[k]) for k in sorted(keys)
               if not math.isclose(want[k], got[k], rel_tol=METRIC_RTOL, abs_tol=METRIC_ATOL)}
        assert not bad, f"{context}: step {want['step']} differs: {bad}"


# --------------------------------------------------------------------------- the shared runs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(random_tiny_model, work):
    """The reference: one process, no launcher, ZeRO-0; (run dir, prompt ids seen per step)."""
    import reward_plugins

    reward_plugins.SEEN_GROUPS.clear()
    result = urlvr.train(recipe_for(random_tiny_model[0], work / "single", zero_stage=0))
    ids = [prompt_id for prompt_id, _, _ in reward_plugins.SEEN_GROUPS]
    assert len(ids) == STEPS * PROMPTS_PER_STEP
    return result.run_dir, [ids[s * PROMPTS_PER_STEP:(s + 1) * PROMPTS_PER_STEP] for s in range(STEPS)]


def _recipe_file(random_tiny_model, work: Path, name: str, zero_stage: int) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_for(random_tiny_model[0], work / name, zero_stage)))
    return path


@pytest.fixture(scope="module")
def two_process_runs(random_tiny_model, work):
    """`run(name) -> run dir` for the runs of TWO_PROCESS_RUNS, each launched on first use."""
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            launcher, stage = TWO_PROCESS_RUNS[name]
            launch(launcher, ["train", str(_recipe_file(random_tiny_model, work, name, zero_stage=stage))], work, name)
            done[name] = work / name
        return done[name]

    return run


@pytest.fixture(scope="module")
def zero2(two_process_runs) -> Path:
    return two_process_runs("zero2")


@pytest.fixture(scope="module")
def zero3(two_process_runs) -> Path:
    return two_process_runs("zero3")


@pytest.fixture(scope="module")
def zero2_resumed(random_tiny_model, work) -> Path:
    """ZeRO-2: two steps under torchrun, then `--resume` for two more under the deepspeed launcher."""
    recipe = _recipe_file(random_tiny_model, work, "zero2_split", zero_stage=2)
    run_dir = work / "zero2_split"
    launch("torchrun", ["train", str(recipe), "--set", "trainer.total_steps=2"], work, "zero2_split-first")
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    launch("deepspeed", ["train", str(recipe), "--resume", str(run_dir)], work, "zero2_split-resumed")
    return run_dir


# --------------------------------------------------------------------------- the assertions
def test_prompt_seeds_make_samples_independent_of_batching(random_tiny_model):
    """What makes ranks interchangeable: with per-prompt seeds a prompt's group is the same
    whichever prompts share the call and however the rows are chunked."""
    from urlvr.rollout import PromptInput, SamplingParams, TransformersRolloutEngine

    _, model, tokenizer = random_tiny_model
    prompts = [PromptInput(f"p{i}", text, tuple(tokenizer.encode(text)))
               for i, text in enumerate(["1+1=", "what is 23*4?", "7-2"])]
    sampling = SamplingParams(max_new_tokens=10, prompt_seeds=(11, 12, 13))
    together = TransformersRolloutEngine(model, tokenizer).generate(prompts, 4, sampling)
    alone = TransformersRolloutEngine(model, tokenizer, generation_batch_size=3).generate(
        prompts[1:2], 4, SamplingParams(max_new_tokens=10, prompt_seeds=(12,)))
    assert [s.token_ids for s in alone[0].samples] == [s.token_ids for s in together[1].samples]
    for a, b in zip(alone[0].samples, together[1].samples):  # log-probs: padding changes float noise only
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({s.token_ids for s in together[1].samples}) > 1  # a group's samples are distinct draws


@pytest.mark.parametrize("run", list(TWO_PROCESS_RUNS))
def test_two_processes_train_like_one(run, two_process_runs, random_tiny_model, single, work):
    launcher, stage = TWO_PROCESS_RUNS[run]
    run_dir = two_process_runs(run)
    context = f"ZeRO-{stage} under {launcher}"
    assert all(seen_by_rank(work / f"{run}-seen").values()), "a rank scored no groups"  # two processes ran
    diff = max_weight_diff(read_weights(single[0]), read_weights(run_dir))
    print(f"{context}, 2 processes vs 1: max |weight diff| = {diff:.3g}")
    assert diff <= WEIGHT_ATOL, f"{context}: final weights differ by {diff}"
    assert_metrics_close(read_metrics(single[0]), read_metrics(run_dir), f"{context} vs one process")
    initial = load_file(random_tiny_model[0] / "model.safetensors")
    assert max_weight_diff(initial, read_weights(run_dir)) > 100 * WEIGHT_ATOL, "training did not move the weights"
    # one writer: a single checkpoint at the end (save_every 0), complete, and one final export
    assert [c.name for c in (run_dir / "checkpoints").iterdir()] == [f"step-{STEPS:06d}"], context
    assert sorted(p.name for p in (run_dir / "final").glob("*.safetensors")) == ["model.safetensors"]


def test_groups_are_never_split_across_ranks(zero2, single, work):
    """Each rank's reward calls get whole groups: rank r holds slice r of every global batch."""
    seen = seen_by_rank(work / "zero2-seen")
    per_rank = PROMPTS_PER_STEP // WORLD
    for rank, calls in seen.items():
        assert len(calls) == STEPS * per_rank
        assert all(len(call["lengths"]) == GROUP_SIZE for call in calls)
        for step, global_batch in enumerate(single[1]):
            mine = [call["prompt_id"] for call in calls[step * per_rank:(step + 1) * per_rank]]
            assert mine == global_batch[rank * per_rank:(rank + 1) * per_rank], (rank, step + 1)


def test_metrics_are_reduced_over_ranks(zero2, work):
    """Rank 0 logs statistics of both ranks' samples, recomputed here from what the rewards saw."""
    seen = seen_by_rank(work / "zero2-seen")
    per_rank = PROMPTS_PER_STEP // WORLD
    for step, logged in enumerate(read_metrics(zero2)):
        lengths = [n for rank in range(WORLD) for call in seen[rank][step * per_rank:(step + 1) * per_rank]
                   for n in call["lengths"]]
        assert len(lengths) == PROMPTS_PER_STEP * GROUP_SIZE
        rewards = torch.tensor([1.0 - n / BUDGET for n in lengths], dtype=torch.float64)
        assert logged["perf/response_tokens"] == sum(lengths)
        assert logged["response/length_mean"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-12)
        assert logged["response/length_max"] == max(lengths)
        assert logged["reward/proxy_mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
        assert logged["reward/proxy_std"] == pytest.approx(float(rewards.std(unbiased=False)), rel=1e-5)
    spread = [len(set(call["lengths"])) > 1 for rank in range(WORLD) for call in seen[rank]]
    assert sum(spread) >= len(spread) // 2, "too few groups with a reward spread to test the gradient"


def test_resume_under_two_processes_continues_exactly(zero2_resumed, zero2):
    assert [c.name for c in sorted((zero2_resumed / "checkpoints").glob("step-*"))] == ["step-000002", "step-000004"]
    assert_metrics_close(read_metrics(zero2), read_metrics(zero2_resumed), "ZeRO-2 resumed vs straight")
    diff = max_weight_diff(read_weights(zero2), read_weights(zero2_resumed))
    print(f"ZeRO-2, 2 + 2 resumed vs 4 straight: max |weight diff| = {diff:.3g}")
    assert diff == 0.0, f"resumed weights differ by {diff}"


def _prompt_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["step"], r["kind"], r["prompt_id"]))


def _rows_close(want: list[dict], got: list[dict], context: str) -> None:
    assert [(r["step"], r["kind"], r["prompt_id"]) for r in got] == [(r["step"], r["kind"], r["prompt_id"]) for r in want], context
    for a, b in zip(want, got):
        assert a.keys() == b.keys(), context
        for key in a:
            same = a[key] == pytest.approx(b[key], rel=METRIC_RTOL) if isinstance(a[key], float) else a[key] == b[key]
            assert same, f"{context}: {a} vs {b}"


@pytest.mark.parametrize("stage", [2, 3])
def test_prompt_tracking_and_kl_gather_every_rank(stage, request, single):
    run_dir = request.getfixturevalue(f"zero{stage}")
    rows = _prompt_rows(run_dir)
    assert {r["kind"] for r in rows} == {"rollout", "greedy"}
    assert len([r for r in rows if r["kind"] == "rollout"]) == STEPS * PROMPTS_PER_STEP  # both ranks' prompts
    _rows_close(_prompt_rows(single[0]), rows, f"ZeRO-{stage} prompts.jsonl vs one process")
    assert [("actor/kl_to_initial" in m) for m in read_metrics(run_dir)] == [False, True, False, True]


def test_prompt_tracking_resumes_exactly(zero2_resumed, zero2):
    _rows_close(_prompt_rows(zero2), _prompt_rows(zero2_resumed), "ZeRO-2 resumed vs straight prompts.jsonl")



def test_token_budget_under_two_processes_trains_like_one(random_tiny_model, work):
    """With a token budget each rank packs its own rows, so ranks can need different numbers of
    micro-batches; they agree on the largest (the short rank repeats a dummy with its loss x 0), or
    ZeRO-3's parameter gathers would hang. Same weights and metrics as one process with fixed
    micro-batches. A large Adam eps keeps each update linear in the gradient: with the default,
    the first steps are lr x sign(g), and the float noise of trimmed shapes in a near-zero
    gradient would become a full lr step."""
    overrides = {"optim": {"lr": 1e-3, "adam_eps": 1e-2}, "trainer": {"total_steps": 2}}
    recipe = recipe_for(random_tiny_model[0], work / "fixed_one_process", zero_stage=0)
    reference = urlvr.train({**recipe, "optim": overrides["optim"], "trainer": {**recipe["trainer"], **overrides["trainer"]}})
    path = _recipe_file(random_tiny_model, work, "zero3_budget", zero_stage=3)
    launch("torchrun", ["train", str(path), "--set", "trainer.max_tokens_per_micro_batch=60", "--set",
                        "optim.adam_eps=0.01", "--set", "trainer.total_steps=2"], work, "zero3_budget")
    run_dir = work / "zero3_budget"
    diff = max_weight_diff(read_weights(reference.run_dir), read_weights(run_dir))
    assert diff <= WEIGHT_ATOL / 10, f"token budget under ZeRO-3: final weights differ by {diff}"
    initial = load_file(random_tiny_model[0] / "model.safetensors")
    assert max_weight_diff(initial, read_weights(run_dir)) > 100 * diff, "training did not move the weights"

    def without_perf(metrics: list[dict]) -> list[dict]:  # padding and tokens per forward differ by design
        return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in metrics]

    assert_metrics_close(without_perf(read_metrics(reference.run_dir)), without_perf(read_metrics(run_dir)),
                         "token budget, 2 processes vs fixed, 1 process")


@pytest.mark.parametrize("run", list(UNEVEN_RUNS))
def test_batches_the_ranks_do_not_divide_train_like_one_process(run, random_tiny_model, work):
    """3 prompts per step on 2 ranks (ZeRO-3: fillers keep the parameter gathers in step) and 1
    prompt per mini-batch (3 optimizer steps per rollout): the same weights and metrics as one
    process, whole groups per rank, and on-policy an importance ratio of exactly 1."""
    import reward_plugins

    launcher, stage, trainer = UNEVEN_RUNS[run]
    model = random_tiny_model[0]
    reward_plugins.SEEN_GROUPS.clear()
    single = urlvr.train(recipe_for(model, work / f"{run}-single", 0, group_size=UNEVEN_GROUP_SIZE, trainer=trainer))
    per_step = trainer["prompts_per_step"]
    ids = [prompt_id for prompt_id, _, _ in reward_plugins.SEEN_GROUPS]
    global_batches = [ids[s * per_step:(s + 1) * per_step] for s in range(STEPS)]
    recipe = work / f"{run}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(model, work / run, stage, group_size=UNEVEN_GROUP_SIZE, trainer=trainer)))
    launch(launcher, ["train", str(recipe)], work, run)
    context = f"{run} (ZeRO-{stage} under {launcher})"

    seen = seen_by_rank(work / f"{run}-seen")  # rank 0 holds prompts [0, 2), rank 1 prompt 2, whole groups
    for rank, shard in ((0, slice(0, 2)), (1, slice(2, 3))):
        assert all(len(call["lengths"]) == UNEVEN_GROUP_SIZE for call in seen[rank])
        size = shard.stop - shard.start
        assert [[c["prompt_id"] for c in seen[rank][s * size:(s + 1) * size]] for s in range(STEPS)] == \
            [batch[shard] for batch in global_batches], (context, rank)
    diff = max_weight_diff(read_weights(single.run_dir), read_weights(work / run))
    print(f"{context}, 2 processes vs 1: max |weight diff| = {diff:.3g}")
    assert diff <= WEIGHT_ATOL, f"{context}: final weights differ by {diff}"
    assert max_weight_diff(load_file(model / "model.safetensors"), read_weights(work / run)) > 100 * WEIGHT_ATOL
    logged = read_metrics(work / run)
    assert_metrics_close(read_metrics(single.run_dir), logged, f"{context} vs one process")
    _rows_close(_prompt_rows(single.run_dir), _prompt_rows(work / run), f"{context} prompts.jsonl vs one process")
    steps_per_rollout = per_step // trainer["prompts_per_minibatch"]
    assert all(m["actor/optimizer_steps_per_rollout"] == steps_per_rollout for m in logged)
    if steps_per_rollout == 1:  # scoring and training forwards saw the same micro-batches on each rank
        assert all(m["actor/ratio_min"] == m["actor/ratio_max"] == 1.0 for m in logged), context


def test_masked_rows_and_a_token_filter_under_two_processes_train_like_one(random_tiny_model, work):
    """`mask_truncated` + a `high_entropy` token filter + micro-batches of 2 rows under ZeRO-3 with
    3 prompts on 2 ranks (responses of different lengths): the selection and every per-token tensor
    follow each micro-batch's cut, the masked rows' statistics are scored before the update on the
    rank that holds them (the other runs fillers), and the run equals one process with one
    micro-batch per mini-batch: same weights, same metrics (issue 19.1 and 19.4)."""
    algorithm = {"mask_truncated": True, "token_filter": {"name": "high_entropy", "top_fraction": 0.3}}
    trainer = {"prompts_per_step": 3, "prompts_per_minibatch": 3}

    def recipe(name: str, stage: int, micro: int) -> dict:
        out = recipe_for(random_tiny_model[0], work / name, stage, group_size=UNEVEN_GROUP_SIZE,
                         trainer={**trainer, "micro_batch_size": micro})
        return {**out, "algorithm": algorithm}

    single = urlvr.train(recipe("masked_single", 0, 9))
    path = work / "masked_filtered.yaml"
    path.write_text(yaml.safe_dump(recipe("masked_filtered", 3, 2)))
    launch("torchrun", ["train", str(path)], work, "masked_filtered")
    logged = read_metrics(work / "masked_filtered")
    assert any(0 < m["response/truncation_rate"] < 1 for m in logged)  # masked and trained rows in one step
    diff = max_weight_diff(read_weights(single.run_dir), read_weights(work / "masked_filtered"))
    assert diff <= WEIGHT_ATOL, f"final weights differ by {diff}"
    assert_metrics_close(read_metrics(single.run_dir), logged, "masked rows + token filter, 2 processes vs 1")


# --------------------------------------------------------------------------- more than one node
@pytest.fixture(scope="module")
def two_nodes(random_tiny_model, work) -> Path:
    """ZeRO-2 on two "nodes": two torchrun invocations (--nnodes 2, c10d rendezvous on 127.0.0.1)."""
    launch("nodes", ["train", str(_recipe_file(random_tiny_model, work, "two_nodes", zero_stage=2))], work, "two_nodes")
    return work / "two_nodes"


def test_two_nodes_train_like_two_processes_on_one_node(two_nodes, zero2, single, work):
    assert sorted(p.name for p in (work / "two_nodes-seen").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    diff = max_weight_diff(read_weights(zero2), read_weights(two_nodes))
    print(f"two nodes vs two processes on one node: max |weight diff| = {diff:.3g}")
    assert diff <= WEIGHT_ATOL
    assert_metrics_close(read_metrics(zero2), read_metrics(two_nodes), "two nodes vs one node")
    assert_metrics_close(read_metrics(single[0]), read_metrics(two_nodes), "two nodes vs one process")
    _rows_close(_prompt_rows(zero2), _prompt_rows(two_nodes), "two nodes prompts.jsonl")
    # rank 0 of the world alone writes the logs, the export and the checkpoint's shared files
    assert [c.name for c in (two_nodes / "checkpoints").iterdir()] == [f"step-{STEPS:06d}"]
    assert len(read_metrics(two_nodes)) == STEPS


RESHARD_RUNS = {  # run name -> (ZeRO stage, launcher of the first 2 steps, launcher of the last 2)
    "zero2_2to1": (2, "torchrun", "none"), "zero2_1to2": (2, "none", "torchrun"),
    "zero1_2to1": (1, "nodes", "none"), "zero0_1to2": (0, "none", "deepspeed"),
}


@pytest.mark.parametrize("run", list(RESHARD_RUNS))
def test_resume_on_another_number_of_ranks(run, random_tiny_model, single, work):
    """2 steps on 2 ranks then 2 on 1 (and the reverse): ZeRO-1/2 load a universal copy of the
    checkpoint, ZeRO-0 loads it as it is; the run ends like 4 straight steps."""
    stage, first, second = RESHARD_RUNS[run]
    recipe = _recipe_file(random_tiny_model, work, run, zero_stage=stage)
    launch(first, ["train", str(recipe), "--set", "trainer.total_steps=2"], work, f"{run}-first")
    launch(second, ["train", str(recipe), "--resume", str(work / run)], work, f"{run}-resumed")
    assert [m["step"] for m in read_metrics(work / run)] == [1, 2, 3, 4]
    assert (work / run / "checkpoints" / "step-000002" / "universal").is_dir() == (stage > 0)
    diff = max_weight_diff(read_weights(single[0]), read_weights(work / run))
    print(f"{run}: 2 + 2 resumed vs 4 steps in one process: max |weight diff| = {diff:.3g}")
    assert diff <= WEIGHT_ATOL, f"{run}: weights differ by {diff}"
    assert_metrics_close(read_metrics(single[0]), read_metrics(work / run), f"{run} vs one process")


def test_zero3_refuses_another_number_of_ranks_with_the_remedy(zero3, work):
    import shutil

    copy = work / "zero3_copy"
    shutil.copytree(zero3, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["trainer"]["total_steps"] = STEPS + 1
    with pytest.raises(urlvr.RecipeError, match=r"saved on 2 ranks under ZeRO-3 and this run has 1.*Resume on 2 ranks"):
        urlvr.train(recipe, resume=copy)


def test_node_local_run_directories_fail_clearly(tmp_path, monkeypatch):
    """What a node-local output_dir looks like (rank 1 sees another disk), simulated on one rank
    by a second rank's answers: the run stops on every rank, naming the ranks and the remedy."""
    from urlvr.trainer import checkpoint

    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / checkpoint.COMPLETE_MARKER).write_text("step 2\n")
    monkeypatch.setattr(checkpoint, "all_gather_objects", lambda items: [*items, None])  # rank 1: no checkpoint
    with pytest.raises(urlvr.RecipeError, match=r"rank 0: step-000002, rank 1: none.*filesystem all nodes share"):
        checkpoint.agreed_latest_checkpoint(tmp_path)
    monkeypatch.setattr(checkpoint, "all_gather_objects",
                        lambda items: [*items, False] if isinstance(items[0], bool) else [*items, "other"])
    with pytest.raises(urlvr.RecipeError, match=r"ranks \[1\] cannot see the files rank 0 writes"):
        checkpoint.check_shared_run_dir(tmp_path, is_main=True)
    assert not list(tmp_path.glob(".rank-check-*"))  # the probe is cleaned up


def test_restrain_draws_the_prompt_weights_on_uneven_shards_under_zero3_like_one_process(work):
    """RESTRAIN's pass before step 1 (recipes/zoo/restrain.yaml) with 9 prompts on 2 ranks (5 and 4)
    under ZeRO-3, where generation gathers the parameters (a collective): the ranks drew 2 and 1
    batches, each in a context of its own, and gloo aborted on the mismatch. Now: the reference
    shares of one process, by global prompt index, and its metrics."""
    zoo = yaml.safe_load((TESTS.parent / "recipes" / "zoo" / "restrain.yaml").read_text())
    zoo["data"]["source"]["num_problems"] = 9
    single = urlvr.train({**zoo, "output_dir": str(work / "restrain-single")}).run_dir
    zoo["optim"]["deepspeed"]["zero_stage"] = 3
    path = work / "restrain.yaml"
    path.write_text(yaml.safe_dump({**zoo, "output_dir": str(work / "restrain")}))
    log = launch("torchrun", ["train", str(path)], work, "restrain")
    assert "prompt weights: 5/5 prompts drawn" in log.read_text()

    def shares(run_dir: Path) -> dict:
        state = run_dir / "checkpoints" / f"step-{2:06d}" / "trainer_state.json"
        return json.loads(state.read_text())["advantage_shaping"]

    assert len(shares(single)) == 9 and shares(work / "restrain") == shares(single)
    assert_metrics_close(read_metrics(single), read_metrics(work / "restrain"), "restrain, ZeRO-3 on 2 ranks vs one process")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found



@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process trees from /proc (Linux)")
@pytest.mark.parametrize("launcher, ending", [("torchrun", signal.SIGKILL), ("deepspeed", signal.SIGTERM)])
def test_ranks_end_with_their_launcher(random_tiny_model, work, launcher, ending):
    """A launcher killed mid-run (`kill -9`; a SIGTERM, which the `deepspeed` command passes on to
    nobody on one node) leaves no rank behind. torchrun starts each rank in a session of its own
    and never ties it to its life, and the deepspeed launcher's per-node process outlives the
    command above it: the ranks trained on as orphans (~430 MB each here), holding the run
    folder's lock, until the run's last step."""
    name = f"orphans-{launcher}"
    out, recipe, log = work / name, work / f"{name}.yaml", work / f"{name}.log"
    recipe.write_text(yaml.safe_dump(small_run_recipe(random_tiny_model[0], out, trainer={"total_steps": 100_000})))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    port = str(free_port())
    command = ([str(VENV_BIN / "torchrun"), "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                "--master_port", port, "-m", "urlvr.cli", "train", str(recipe)] if launcher == "torchrun" else
               [str(VENV_BIN / "deepspeed"), "--num_gpus", str(WORLD), "--master_port", port, "--module", "urlvr.cli",
                "train", str(recipe)])
    with open(log, "w") as sink:
        main = subprocess.Popen(command, env=env, cwd=work, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[int] = []  # every process under the launcher: its ranks (and the deepspeed per-node one)
    try:
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():  # training
            assert main.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        started = _children(main.pid)
        started += [pid for parent in started for pid in _children(parent)]
        assert len(started) == (WORLD if launcher == "torchrun" else WORLD + 1), started
        main.send_signal(ending)
        main.wait()
        for _ in range(1200):  # within a second or so; two minutes on a loaded host is still a pass
            if not any(process_alive(pid) for pid in started):
                break
            time.sleep(0.1)
        assert not [pid for pid in started if process_alive(pid)], "processes outlived their launcher"
        assert "its launcher" in log.read_text()  # and a rank said why it stopped
    finally:
        main.kill()
        for pid in started:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("variables, depth", [
    ({}, 0), ({"RANK": "0", "WORLD_SIZE": "2"}, 0),  # a user's own RANK, srun, mpirun: a parent may exit on purpose
    ({"RANK": "1", "TORCHELASTIC_RUN_ID": "none"}, 1),  # torchrun, accelerate launch: the agent
    ({"RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0", "CROSS_SIZE": "1"}, 2),  # deepspeed, one node: and the command
    ({"RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1", "CROSS_SIZE": "2"}, 1),  # deepspeed over nodes: its per-node process
    ({"RANK": "1", "LOCAL_SIZE": "2"}, 0),  # deepspeed's MPI runners set LOCAL_SIZE too, without its launcher
])
def test_only_known_launchers_are_watched(monkeypatch, variables, depth):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert urlvr.dist._launchers_to_watch() == depth
