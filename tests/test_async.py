"""Generation apart from training (`rollout.engine: server`, `trainer.max_staleness`), on CPU with
the transformers backend in a `urlvr serve` subprocess (the vLLM backend: tests/test_vllm.py).

What is proven here:
- k = 0 through the server trains bit-identically to the colocated engine (metrics and weights);
- k = 1 overlaps: staleness 1 from step 2 on, never more; a kill -9 mid-run and `--resume` train
  exactly the prompts and samples of the uninterrupted run, none lost or repeated;
- after every sync the server's greedy output equals the trainer's, a LoRA model's too (merged),
  and changes from the base model's (a sync that never reaches the server is the failure);
- a server that never comes up, dies, hangs, or serves another version is a GenerationServerError
  within its timeout, and the server does not outlive a killed trainer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import lora_with_random_adapters, small_run_recipe
from urlvr.dist import DistInfo
from urlvr.errors import GenerationServerError, RecipeError
from urlvr.recipe import load_recipe
from urlvr.rollout.base import PromptInput, SamplingParams
from urlvr.rollout.server_engine import ServerRolloutEngine
from urlvr.rollout.transformers_engine import TransformersRolloutEngine
from urlvr.trainer.run import train

TESTS = Path(__file__).resolve().parent
VOLATILE = ("time/", "async/", "perf/tokens_per_second")
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def async_recipe(model_path: Path, out: Path, *, engine: str | dict = "server", steps: int = 4, **trainer) -> dict:
    if engine == "server":
        engine = {"name": "server", "backend": "transformers", "startup_timeout_s": 300, "request_timeout_s": 300}
    return small_run_recipe(
        model_path, out, plugins=["reward_plugins"],
        reward={"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"},
        rollout={"engine": engine, "group_size": 4, "max_new_tokens": 12, "stop_token_ids": [3, 4, 5, 6, 7]},
        trainer={"total_steps": steps, "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 8,
                 "save_every": 0, **trainer},
        logging={"console": False, "completions_per_step": 16},
    )


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def trained_prompts(run_dir: Path) -> list[tuple[int, str, str]]:
    return sorted((row["step"], row["prompt_id"], row["response"])
                  for row in map(json.loads, (run_dir / "completions.jsonl").read_text().splitlines()))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def colocated_run(random_tiny_model, tmp_path_factory):
    path, _, _ = random_tiny_model
    out = tmp_path_factory.mktemp("async") / "colocated"
    train(async_recipe(path, out, engine="transformers"))
    return out


def test_staleness_0_through_the_server_trains_bit_identically_to_the_colocated_engine(
        random_tiny_model, colocated_run, tmp_path):
    path, _, _ = random_tiny_model
    train(async_recipe(path, tmp_path / "server"))
    server, colocated = metric_rows(tmp_path / "server"), metric_rows(colocated_run)
    assert server == colocated
    assert any(row["actor/grad_norm"] > 0 for row in server)  # the comparison covers real updates
    assert trained_prompts(tmp_path / "server") == trained_prompts(colocated_run)
    for name, tensor in final_weights(colocated_run).items():
        assert torch.equal(final_weights(tmp_path / "server")[name], tensor), name
    logged = [json.loads(line) for line in (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["async/staleness_max"] == 0 for row in logged)


def test_staleness_1_overlaps_and_never_trains_an_older_sample(random_tiny_model, colocated_run, tmp_path):
    path, _, _ = random_tiny_model
    train(async_recipe(path, tmp_path / "k1", max_staleness=1))
    logged = [json.loads(line) for line in (tmp_path / "k1" / "metrics.jsonl").read_text().splitlines()]
    assert [row["async/staleness_max"] for row in logged] == [0, 1, 1, 1]
    assert [row["async/staleness_mean"] for row in logged] == [0, 1, 1, 1]
    assert [row["async/in_flight"] for row in logged] == [1, 1, 1, 0]  # the last step asks for nothing ahead
    # step 1 samples the same policy either way; the later steps sample an older one than on-policy
    k1, k0 = trained_prompts(tmp_path / "k1"), trained_prompts(colocated_run)
    assert [r for r in k1 if r[0] == 1] == [r for r in k0 if r[0] == 1]
    assert [r[:2] for r in k1] == [r[:2] for r in k0]  # the same prompts, step by step
    assert [r for r in k1 if r[0] > 1] != [r for r in k0 if r[0] > 1]
    log = (tmp_path / "k1" / "server" / "server.log").read_text()
    assert [f"serving policy version {v}" in log for v in range(5)] == [True] * 5


def _run_cli(recipe: dict, folder: Path, *extra: str) -> subprocess.Popen:
    recipe_file = folder / f"recipe-{len(list(folder.glob('recipe-*')))}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}  # this process's own world
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "urlvr.cli", "train", str(recipe_file), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_after_checkpoint(recipe: dict, folder: Path, run_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Run `urlvr train` on `recipe` and kill -9 its session once the step-2 checkpoint is complete
    (the server has a session of its own); (the killed process, the checkpoint's COMPLETE marker)."""
    trainer = _run_cli(recipe, folder)
    checkpoint = run_dir / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if trainer.poll() is None:
        os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait()
    return trainer, checkpoint


def _server_pid(run_dir: Path) -> int:
    log = (run_dir / "server" / "server.log").read_text()
    return int(log.rsplit("pid ", 1)[1].split(")")[0])


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it was ours
        except ChildProcessError:
            pass
        time.sleep(0.2)
    return False


def test_a_kill_9_with_rollouts_in_flight_then_resume_trains_exactly_the_uninterrupted_run(random_tiny_model,
                                                                                             tmp_path):
    path, _, _ = random_tiny_model
    whole = async_recipe(path, tmp_path / "whole", steps=6, max_staleness=2, save_every=2)
    train(whole)
    killed = async_recipe(path, tmp_path / "killed", steps=6, max_staleness=2, save_every=2)
    trainer, checkpoint = _kill_after_checkpoint(killed, tmp_path, tmp_path / "killed")
    assert trainer.returncode == -signal.SIGKILL, trainer.stdout.read().decode()[-3000:]
    assert _gone(_server_pid(tmp_path / "killed"), within_s=60), "the server outlived the killed trainer"
    state = json.loads((checkpoint.parent / "trainer_state.json").read_text())
    assert state["in_flight_steps"] == [3, 4]  # what the resume must train without sampling again
    resumed = _run_cli(killed, tmp_path, "--resume", str(tmp_path / "killed"))
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "whole")
    assert trained_prompts(tmp_path / "killed") == trained_prompts(tmp_path / "whole")
    assert len({(step, prompt) for step, prompt, _ in trained_prompts(tmp_path / "whole")}) == 6 * 4
    for name, tensor in final_weights(tmp_path / "whole").items():
        assert torch.equal(final_weights(tmp_path / "killed")[name], tensor), name


def test_a_server_urlvr_started_ends_within_seconds_of_a_killed_trainer_even_mid_generation(random_tiny_model,
                                                                                             tmp_path):
    """The server notices a closed connection only between requests; a generation of minutes
    would hold its devices while a resumed run starts its new server on them."""
    path, _, _ = random_tiny_model
    recipe = async_recipe(path, tmp_path / "run", steps=2, max_staleness=1)
    recipe["plugins"] = ["reward_plugins", "engine_plugins"]
    recipe["rollout"]["engine"]["backend"] = {"name": "test_slow", "delay_s": 3600}
    trainer = _run_cli(recipe, tmp_path)
    log = tmp_path / "run" / "server" / "server.log"
    while trainer.poll() is None and not (log.exists() and "test_slow: generating" in log.read_text()):
        time.sleep(0.1)
    assert trainer.poll() is None, trainer.stdout.read().decode()[-3000:]
    os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait()
    assert _gone(_server_pid(tmp_path / "run"), within_s=60), "the server outlived the killed trainer"


def test_resuming_on_the_colocated_engine_samples_the_stored_prompts_again_on_policy(random_tiny_model, tmp_path):
    path, _, _ = random_tiny_model
    mid = async_recipe(path, tmp_path / "mid", steps=4, max_staleness=2, save_every=2)
    _, checkpoint = _kill_after_checkpoint(mid, tmp_path, tmp_path / "mid")
    stored = torch.load(checkpoint.parent / "inflight.pt", weights_only=False)
    assert [entry["step"] for entry in stored] == [3, 4]
    colocated = {**mid, "rollout": {**mid["rollout"], "engine": "transformers"},
                 "trainer": {**mid["trainer"], "max_staleness": 0}}
    train(colocated, resume=tmp_path / "mid")
    trained = trained_prompts(tmp_path / "mid")
    for entry in stored:  # the stored prompts, in their steps, none lost or repeated
        assert sorted(prompt for step, prompt, _ in trained if step == entry["step"]) == \
            sorted(r.prompt_id for r in entry["records"] for _ in range(4))  # 4 samples each
    # sampled again by the resumed policy: not the stored (stale) responses
    stale = sorted(s.text for entry in stored for g in entry["drawn"] for s in g.samples)
    assert sorted(response for step, _, response in trained if step > 2) != stale


# --------------------------------------------------------------------------- the engine on its own
def _engine_recipe(model_path: Path, out: Path, **engine) -> object:
    options = {"name": "server", "backend": "transformers", "startup_timeout_s": 120, "request_timeout_s": 120,
               **engine}
    return load_recipe(small_run_recipe(model_path, out, rollout={"engine": options, "group_size": 2,
                                                                    "max_new_tokens": 8}))


@pytest.fixture
def served(random_tiny_model, tmp_path):
    """(engine, the trainer's model copy, tokenizer) with a running server; closed after the test."""
    path, model, tokenizer = random_tiny_model
    trainer_model = type(model)(model.config)
    trainer_model.load_state_dict(model.state_dict())
    engine = ServerRolloutEngine.from_recipe(_engine_recipe(path, tmp_path / "run", request_timeout_s=20),
                                             trainer_model, tokenizer, CPU)
    yield engine, trainer_model, tokenizer
    engine.close()


def _prompts(tokenizer, count: int = 3) -> list[PromptInput]:
    texts = [f"{i} + {i + 1} = " for i in range(count)]
    return [PromptInput(f"p{i}", text, tuple(tokenizer(text)["input_ids"])) for i, text in enumerate(texts)]


GREEDY = SamplingParams(max_new_tokens=10, greedy=True)


def _greedy_tokens(groups) -> list[tuple[int, ...]]:
    return [s.token_ids for g in groups for s in g.samples]


def test_after_every_sync_the_server_greedy_output_equals_the_trainers(served):
    engine, model, tokenizer = served
    prompts, local = _prompts(tokenizer), TransformersRolloutEngine(model, tokenizer)
    before = _greedy_tokens(engine.generate(prompts, 1, GREEDY))
    assert before == _greedy_tokens(local.generate(prompts, 1, GREEDY))
    for version in (1, 2):
        torch.manual_seed(version)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.5)
        engine.push_weights(model, version)
        groups = engine.generate(prompts, 1, GREEDY)
        assert {g.policy_version for g in groups} == {version}
        assert _greedy_tokens(groups) == _greedy_tokens(local.generate(prompts, 1, GREEDY))
    assert _greedy_tokens(groups) != before  # the weights moved far enough to change the answers


def test_a_lora_model_is_served_merged_and_its_samples_change_after_the_first_sync(served):
    engine, model, tokenizer = served
    prompts = _prompts(tokenizer)
    base = _greedy_tokens(engine.generate(prompts, 1, GREEDY))
    lora = lora_with_random_adapters(model)
    engine.push_weights(lora, 1)
    served_lora = _greedy_tokens(engine.generate(prompts, 1, GREEDY))
    assert served_lora == _greedy_tokens(TransformersRolloutEngine(lora, tokenizer).generate(prompts, 1, GREEDY))
    assert served_lora != base


def test_a_request_for_an_older_version_than_the_server_serves_is_an_error(served):
    engine, model, tokenizer = served
    engine.push_weights(model, 3)
    with pytest.raises(GenerationServerError, match="wants policy version 2, the server serves 3"):
        engine.collect(engine.submit(_prompts(tokenizer), 1, GREEDY, version=2))
    assert engine.generate(_prompts(tokenizer), 1, GREEDY)  # the server stays up for the next request


def test_a_server_that_dies_is_reported_at_once_with_its_log(served):
    engine, _, tokenizer = served
    engine.process.kill()
    started = time.monotonic()
    with pytest.raises(GenerationServerError, match="exited|closed the connection") as caught:
        engine.generate(_prompts(tokenizer), 1, GREEDY)
    assert time.monotonic() - started < 15
    assert "server.log" in str(caught.value)


def test_a_hung_server_is_an_error_after_request_timeout_s(random_tiny_model, tmp_path):
    path, model, tokenizer = random_tiny_model
    engine = ServerRolloutEngine.from_recipe(_engine_recipe(path, tmp_path / "run", request_timeout_s=3),
                                             model, tokenizer, CPU)
    try:
        os.kill(engine.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(GenerationServerError, match=r"did not answer request 0 within 3 s.*request_timeout_s"):
            engine.generate(_prompts(tokenizer), 1, GREEDY)
        assert time.monotonic() - started < 30
    finally:
        os.kill(engine.process.pid, signal.SIGCONT)
        engine.close()


def test_a_server_that_never_comes_up_is_an_error_naming_its_log(random_tiny_model, tmp_path):
    path, model, tokenizer = random_tiny_model
    recipe = _engine_recipe(path, tmp_path / "run")
    broken = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": str(tmp_path / "nowhere")})})
    with pytest.raises(GenerationServerError, match=r"exited \(code \d+\) before it answered.*server.log"):
        ServerRolloutEngine.from_recipe(broken, model, tokenizer, CPU)


def test_the_default_vllm_backend_without_vllm_is_one_line_before_a_server_starts(random_tiny_model, tmp_path):
    """`rollout.engine: server` defaults to the vllm backend; without vLLM here the remedy was inside the
    dead server's log excerpt. Now it is the error, and no server process is started."""
    import importlib.util

    from urlvr.errors import RecipeError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    path, model, tokenizer = random_tiny_model
    recipe = _engine_recipe(path, tmp_path / "run", backend="vllm")
    with pytest.raises(RecipeError, match=r"^rollout.engine.backend vllm: .*rollout.engine.backend: transformers\)$"):
        ServerRolloutEngine.from_recipe(recipe, model, tokenizer, CPU)
    assert not (tmp_path / "run" / "server").exists()


def test_attaching_to_something_that_never_answers_the_handshake_is_bounded(random_tiny_model, tmp_path):
    path, model, tokenizer = random_tiny_model
    with socket.socket() as mute:  # accepts connections, says nothing
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        accepted = []
        threading.Thread(target=lambda: accepted.append(mute.accept()), daemon=True).start()
        recipe = _engine_recipe(path, tmp_path / "run", address=f"127.0.0.1:{port}", startup_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(GenerationServerError, match="did not complete urlvr's handshake within 2 s"):
            ServerRolloutEngine.from_recipe(recipe, model, tokenizer, CPU)
        assert time.monotonic() - started < 20


def test_nothing_listening_at_the_address_is_an_error_within_startup_timeout_s(random_tiny_model, tmp_path):
    path, model, tokenizer = random_tiny_model
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    recipe = _engine_recipe(path, tmp_path / "run", address=f"127.0.0.1:{port}", startup_timeout_s=2)
    with pytest.raises(GenerationServerError, match=f"no generation server answered at 127.0.0.1:{port} within 2 s"):
        ServerRolloutEngine.from_recipe(recipe, model, tokenizer, CPU)


class _Clock:
    """A monotonic clock the test moves by hand: the server's idle time is read off it, never raced."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Connection:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, message: tuple) -> None:
        self.sent.append(message)


def test_server_idle_counts_the_wait_for_weights_and_not_the_weight_load(monkeypatch):
    """`async/server_idle_s` is the time since the server's last generation ended, less the time
    it spent loading weights: with k = 0 the server waits out the whole update, and that wait
    (before the sync arrives) is idleness the metric must show, not hide behind the sync."""
    from urlvr.rollout import server

    clock = _Clock()
    monkeypatch.setattr(server.time, "monotonic", clock)

    class Backend:
        def generate(self, prompts, group_size, sampling):
            clock.now += 1.0  # generation takes 1 s
            return []

    class Channel:
        def receive(self, layout):
            clock.now += 0.5  # the weights take 0.5 s to arrive and load
            return iter(())

    conn = _Connection()
    state = server.ServerState(Backend(), lambda weights: list(weights), store=None, version=0, channel=Channel(),
                               idle_since=0.0, owner=conn)
    clock.now = 2.0  # the trainer's first request comes 2 s after the server is ready
    server._handle(conn, ("generate", 0, [], 1, GREEDY, 0), state, log=lambda line: None)
    clock.now = 7.0  # the trainer trains for 4 s, then syncs (to 7.5 s)
    server._handle(conn, ("sync", 1, [], False), state, log=lambda line: None)
    clock.now = 8.0  # and asks for the next rollout 0.5 s after the sync
    server._handle(conn, ("generate", 1, [], 1, GREEDY, 1), state, log=lambda line: None)
    idle = [message[4] for message in conn.sent]
    assert idle == [2.0, 4.0 + 0.5]


def test_the_servers_own_error_line_leads_the_log_hint_when_shutdown_lines_follow_it(tmp_path):
    from urlvr.rollout.server_engine import server_log_hint

    log = tmp_path / "server.log"
    cause = "urlvr: Exception: Call to collective_rpc method failed: 'list' object has no attribute 'dtype'"
    shutdown = [f"(EngineCore pid=7) INFO [multiproc_executor.py:479] [shutdown] line {i}" for i in range(6)]
    log.write_text("\n".join(["urlvr: note: a note, not an error", cause, "(run with --debug for the traceback)",
                               *shutdown]) + "\n")
    hint = server_log_hint(log)
    assert hint.startswith("; it stopped with Exception: Call to collective_rpc method failed")
    assert hint.endswith("\n  ".join(shutdown[-5:]))  # the tail as before
    log.write_text("\n".join(["urlvr serve: ready", cause, "(run with --debug for the traceback)"]) + "\n")
    assert server_log_hint(log).startswith(f"; its log ({log}) ends:")  # in the tail already: said once
    log.write_text("\n".join(["urlvr: note: a note, not an error", *shutdown]) + "\n")
    assert server_log_hint(log).startswith(f"; its log ({log}) ends:")


def _slow_server(model_path: Path, out: Path, model, tokenizer, *, request_timeout_s: float = 120,
                 **backend) -> ServerRolloutEngine:
    """A server whose backend is tests/engine_plugins.py's `test_slow` (`delay_s`, `text_bytes`)."""
    engine = {"name": "server", "backend": {"name": "test_slow", **backend}, "startup_timeout_s": 120,
              "request_timeout_s": request_timeout_s}
    recipe = load_recipe(small_run_recipe(model_path, out, plugins=["engine_plugins"],
                                          rollout={"engine": engine, "group_size": 2, "max_new_tokens": 8}))
    return ServerRolloutEngine.from_recipe(recipe, model, tokenizer, CPU)


def test_a_sync_completes_while_an_answer_larger_than_the_socket_buffers_waits_to_be_read(random_tiny_model,
                                                                                           tmp_path):
    """k >= 1: the server answers the next step's request (a real step's groups are megabytes)
    while the trainer is in the weight broadcast. A trainer that reads answers only when it
    collects them leaves the server blocked on sending, and the broadcast waits for that server:
    a deadlock until request_timeout_s, at every step of every real run."""
    path, model, tokenizer = random_tiny_model
    engine = _slow_server(path, tmp_path / "run", model, tokenizer, text_bytes=6_000_000)  # 24 MB of groups
    try:
        ticket = engine.submit(_prompts(tokenizer, 2), 2, GREEDY, version=0)
        engine.push_weights(model, 1)
        served = engine.collect(ticket)
        assert [len(s.text) >= 6_000_000 for g in served.groups for s in g.samples] == [True] * 4
        assert {g.policy_version for g in engine.generate(_prompts(tokenizer, 2), 1, GREEDY)} == {1}
    finally:
        engine.close()


# --------------------------------------------------------------------------- a server the user started
@pytest.fixture
def user_server(random_tiny_model, tmp_path):
    """(address, key) of `urlvr serve` started as a user would (its own key, any free port);
    stopped after the test."""
    path, _, _ = random_tiny_model
    recipe = small_run_recipe(path, tmp_path / "served", rollout={"engine": {"name": "server", "backend": "transformers"}})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(recipe))
    key, log = "user-key", tmp_path / "serve.log"
    env = {**os.environ, "URLVR_SERVER_KEY": key}
    with open(log, "wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "urlvr.cli", "serve", str(tmp_path / "serve.yaml"), "--port",
                                   "0"], env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while "ready on" not in log.read_text() and server.poll() is None:
            time.sleep(0.2)
        assert server.poll() is None, log.read_text()
        port = log.read_text().split("ready on 127.0.0.1:", 1)[1].split()[0]
        yield f"127.0.0.1:{port}", key
    finally:
        server.kill()
        server.wait()


def _attach(model_path: Path, out: Path, address: str, model, tokenizer, **engine) -> ServerRolloutEngine:
    return ServerRolloutEngine.from_recipe(_engine_recipe(model_path, out, address=address, **engine), model,
                                           tokenizer, CPU)


def test_a_wrong_key_or_a_silent_connection_does_not_lock_the_next_trainer_out(user_server, random_tiny_model,
                                                                                 tmp_path, monkeypatch):
    """The key exchange of one client (a wrong key, or a port scanner that connects and says
    nothing) must not stop or block the server's acceptance of the next trainer."""
    address, key = user_server
    path, model, tokenizer = random_tiny_model
    monkeypatch.setenv("URLVR_SERVER_KEY", "not-the-key")
    with pytest.raises(GenerationServerError, match="refused the key"):
        _attach(path, tmp_path / "wrong", address, model, tokenizer)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))):  # connects, says nothing, stays open
        monkeypatch.setenv("URLVR_SERVER_KEY", key)
        engine = _attach(path, tmp_path / "right", address, model, tokenizer, startup_timeout_s=60)
        assert {g.policy_version for g in engine.generate(_prompts(tokenizer), 1, GREEDY)} == {0}
        engine.close()


def test_a_second_run_cannot_take_the_weights_of_a_server_another_run_holds(user_server, random_tiny_model,
                                                                            tmp_path, monkeypatch):
    """Two runs on one server would push the same version numbers with different weights: one
    run's requests would be sampled by the other's policy, silently. The second is refused at
    once; when the first leaves, the next run takes the server over."""
    address, key = user_server
    path, model, tokenizer = random_tiny_model
    monkeypatch.setenv("URLVR_SERVER_KEY", key)
    first = _attach(path, tmp_path / "first", address, model, tokenizer)
    with pytest.raises(GenerationServerError, match="refused this trainer: another training run holds this server"):
        _attach(path, tmp_path / "second", address, model, tokenizer)
    assert {g.policy_version for g in first.generate(_prompts(tokenizer), 1, GREEDY)} == {0}  # undisturbed
    first.close()  # the first run ends
    after = _attach(path, tmp_path / "after", address, model, tokenizer)
    assert {g.policy_version for g in after.generate(_prompts(tokenizer), 1, GREEDY)} == {0}
    after.close()


def test_a_run_that_starts_on_a_server_a_finished_run_left_at_a_later_version_is_served(user_server,
                                                                                       random_tiny_model, tmp_path,
                                                                                       monkeypatch):
    """A run left the server at version 5; the next run's rank 1 may ask for version 0 before
    its rank 0 has pushed it: the request waits for that push (not an error about version 5)."""
    address, key = user_server
    path, model, tokenizer = random_tiny_model
    monkeypatch.setenv("URLVR_SERVER_KEY", key)
    finished = _attach(path, tmp_path / "finished", address, model, tokenizer)
    finished.push_weights(model, 5)
    finished.close()
    rank1 = ServerRolloutEngine.from_recipe(_engine_recipe(path, tmp_path / "new", address=address), model, tokenizer,
                                            DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu")))
    ticket = rank1.submit(_prompts(tokenizer), 1, GREEDY, version=0)
    rank0 = _attach(path, tmp_path / "new", address, model, tokenizer)  # pushes version 0
    assert rank1.collect(ticket).version == 0
    rank0.close()
    rank1.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"intermediate_size": 96}, r"model.layers.0.mlp.gate_proj.weight is \[96, 64\] in the trainer, \[128, 64\] in the server"),
    ({"num_hidden_layers": 3}, "it sends 'model.layers.2.self_attn.q_proj.weight', which the server's model does not have"),
])
def test_a_trainer_whose_model_does_not_fit_the_servers_is_one_clear_error_at_once(change, message, user_server,
                                                                                   random_tiny_model, tmp_path,
                                                                                   monkeypatch):
    """A server started for another model: the first sync names the first weight that does not
    fit, before any weight moves (a load that fails half-way would leave the trainer in the
    broadcast until request_timeout_s)."""
    address, key = user_server
    path, model, tokenizer = random_tiny_model
    other = type(model)(model.config.__class__(**{**model.config.to_dict(), **change}))
    monkeypatch.setenv("URLVR_SERVER_KEY", key)
    with pytest.raises(GenerationServerError, match=f"failed a weight sync: the trainer's model does not fit this "
                                                     f"server's \\(.*\\): {message}"):
        _attach(path, tmp_path / "other", address, other, tokenizer, request_timeout_s=60)
    attached = _attach(path, tmp_path / "same", address, model, tokenizer)  # the server is free for the right model
    assert {g.policy_version for g in attached.generate(_prompts(tokenizer), 1, GREEDY)} == {0}
    attached.close()


@pytest.mark.parametrize(("port", "message"), [(70000, "--port 70000: a port is 0-65535"),
                                               ("busy", r"cannot listen on 127.0.0.1:\d+ \(Address already in use\)")])
def test_urlvr_serve_refuses_a_bad_or_busy_address_before_loading_the_model(port, message, tmp_path):
    from urlvr.commands.serve import run_server

    recipe = small_run_recipe(tmp_path / "no-model-here", tmp_path / "run", rollout={"engine": {"name": "server"}})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(recipe))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] if port == "busy" else port
        with pytest.raises(RecipeError, match=message):  # the address, not the missing model: it fails first
            run_server(tmp_path / "serve.yaml", host="127.0.0.1", port=port, key=None)


# --------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize(("change", "message"), [
    ({"trainer": {"max_staleness": 1}}, "needs an engine that samples apart from the trainer"),
    ({"trainer": {"max_staleness": 1, "total_steps": 4},
      "rollout": {"engine": {"name": "server", "backend": "transformers"},
                  "dynamic_sampling": {"name": "zero_variance"}}}, "with rollout.dynamic_sampling is not supported"),
    ({"rollout": {"engine": {"name": "server", "backend": "server"}}}, "server cannot be used here: the server runs a colocated engine"),
    ({"rollout": {"engine": {"name": "server", "backend": "transformers", "tensor_parallel_size": 2}}},
     "has no tensor parallelism"),
    ({"rollout": {"engine": {"name": "server", "backend": {"name": "vllm", "kwargs": {"tensor_parallel_size": 2}}}}},
     "set rollout.engine.tensor_parallel_size instead"),
    ({"rollout": {"engine": {"name": "server", "address": "10.0.0.5"}}}, "is not host:port"),
    ({"rollout": {"engine": {"name": "server", "backend": {"name": "vllm", "sync_bucket_mb": 8}}}},
     "backend.sync_bucket_mb does nothing in a server"),
    ({"rollout": {"engine": {"name": "server", "backend": {"name": "vllm", "sleep": False}}}},
     "backend.sleep does nothing in a server"),
    ({"trainer": {"max_staleness": -1}}, "greater than or equal to 0"),
])
def test_the_recipe_refuses_what_would_not_act_or_cannot_work(change, message, tmp_path):
    recipe = small_run_recipe(Path("urlvr/tiny"), tmp_path)
    for section, values in change.items():
        recipe[section] = {**recipe[section], **values}
    with pytest.raises(Exception, match=message):
        load_recipe(recipe)


# --------------------------------------------------------------------------- two trainer ranks
@pytest.mark.slow
def test_two_ranks_share_one_server_and_train_like_one_rank(random_tiny_model, tmp_path):
    """torchrun, 2 gloo ranks, ZeRO-3 (each weight bucket gathered on both ranks, sent by rank 0);
    each rank sends its own prompts. Equal to one rank within the float tolerance of
    tests/test_distributed.py (ZeRO-3 sums gradients in another order)."""
    from test_distributed import METRIC_ATOL, METRIC_RTOL, WEIGHT_ATOL, launch

    path, _, _ = random_tiny_model
    recipe = async_recipe(path, tmp_path / "two", steps=3, max_staleness=1)
    recipe["optim"] = {"lr": 1e-3, "adam_eps": 1e-2, "deepspeed": {"zero_stage": 3}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe))
    launch("torchrun", ["train", str(tmp_path / "two.yaml")], tmp_path, "two")
    one = {**recipe, "output_dir": str(tmp_path / "one")}
    train(one)
    two_rows, one_rows = metric_rows(tmp_path / "two"), metric_rows(tmp_path / "one")
    assert [r["step"] for r in two_rows] == [1, 2, 3]
    for two_row, one_row in zip(two_rows, one_rows):
        for key, value in one_row.items():
            if key.startswith(("perf/", "rollout/logprob_mismatch", "rollout/mismatch_kl")):
                continue
            assert two_row[key] == pytest.approx(value, rel=METRIC_RTOL, abs=METRIC_ATOL), key
    two_samples = trained_prompts(tmp_path / "two")  # completions.jsonl holds the main rank's groups
    assert len(two_samples) == 3 * 2 * 4 and set(two_samples) <= set(trained_prompts(tmp_path / "one"))
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["async/staleness_max"] for row in logged] == [0, 1, 1]
    two_weights, one_weights = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, atol=WEIGHT_ATOL, rtol=0)


def test_an_engine_whose_section_overlaps_training_needs_the_overlap_members_at_registration():
    from urlvr.rollout.base import check_engine
    from urlvr.rollout.server_engine import ServerEngineSection

    class Half(TransformersRolloutEngine):  # the protocol, but says it samples apart, without submit/collect
        settings = ServerEngineSection

    with pytest.raises(TypeError, match="has no method 'submit' of the OverlappingRolloutEngine protocol"):
        check_engine(Half, "server")

    class WrongCollect(ServerRolloutEngine):
        def collect(self):
            return None

    with pytest.raises(TypeError, match="collect takes"):
        check_engine(WrongCollect, "server")


def test_the_server_generation_time_is_logged_so_the_overlap_can_be_read(random_tiny_model, tmp_path):
    path, _, _ = random_tiny_model
    train(async_recipe(path, tmp_path / "k1", steps=2, max_staleness=1))
    logged = [json.loads(line) for line in (tmp_path / "k1" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["async/server_generate_s"] > 0 for row in logged)


def test_the_server_sees_a_finished_run_hang_up_without_taking_its_messages():
    """A run that ended (its engine closed) is no rival of the next run, even when the next run's
    request is read before the old connection's end: the server peeks at the old socket."""
    from multiprocessing import Pipe

    from urlvr.rollout.server import _hung_up

    server_end, trainer_end = Pipe()
    assert not _hung_up(server_end)  # open, nothing sent
    trainer_end.send(("generate", 0))
    assert not _hung_up(server_end) and server_end.recv() == ("generate", 0)  # the message is still there
    trainer_end.close()
    assert _hung_up(server_end)
