"""`rollout.engine: server`: rollouts from a generation server in a process of its own.

The server (rollout/server.py, `urlvr serve`) runs a colocated engine (`backend`: vllm or
transformers) on devices the trainer does not use. Urlvr starts it beside the trainer (the
default) or attaches to one already running (`address`). What it adds over a colocated engine:

- it can overlap with training: `submit` sends a request and returns at once, `collect` waits
  for its groups, so the trainer's producer (trainer/producer.py) keeps up to
  `trainer.max_staleness` rollouts in flight while it trains;
- every group comes back tagged with the policy version that sampled it, which the server
  reports and the engine checks against the version the request asked for: a sync that never
  reached the server is an error, never a rollout silently sampled by an older policy;
- weights move over a real collective (rollout/weight_channel.py: gloo), bucketed and gathered
  per bucket under ZeRO-3, LoRA merged, exactly as the colocated vLLM engine loads them.

Failure handling: the server must answer the first connection within `startup_timeout_s`, each
request within `request_timeout_s`, each weight broadcast within `request_timeout_s`; a server
that exits, or closes the connection, is reported at once with the tail of its log. Every such
failure raises GenerationServerError (one line on the console).
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import queue
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import torch.distributed as td
import yaml
from pydantic import Field, field_validator, model_validator

from urlvr.dist import DistInfo, all_gather_objects, free_port
from urlvr.errors import GenerationServerError, RecipeError
from urlvr.progress import format_seconds
from urlvr.recipe.variants import VariantOf
from urlvr.rollout.base import ROLLOUT_ENGINES, Group, PromptInput, SamplingParams, Served, check_generate_request
from urlvr.rollout.server import PROTOCOL
from urlvr.rollout.vllm_engine import MISSING_VLLM
from urlvr.rollout.weight_channel import TRAINER, TensorSpec, WeightChannel
from urlvr.rollout.weight_sync import iter_weights, parameter_buckets
from urlvr.section import VariantSection

KEY_VARIABLE = "URLVR_SERVER_KEY"  # the shared secret of a server the user started (attach mode)
LOCAL_KEY = "urlvr-local"  # the key of a server on this machine's loopback started without one
_CLOSE_WAIT_S = 30.0  # the most a closing run waits for its last weights to reach the server
_POLL_S = 0.5  # how often a wait looks at the server process while it waits for an answer


# backend knobs that only act beside a trainer on the same device -> what takes their place in a server
_COLOCATED_ONLY = {
    "sync_bucket_mb": "weights arrive in the buckets of rollout.engine.sync_bucket_mb",
    "sleep": "the server never gives its devices to a trainer, so it never sleeps",
}


def _colocated(section: type[VariantSection]) -> bool:
    """An engine a server can run: one that samples where it is built (not another server)."""
    return not getattr(section, "overlaps_training", False)


class ServerEngineSection(VariantSection):
    """`rollout.engine: server`: a generation server on devices of its own (docs/async.md)."""

    name: Literal["server"] = "server"
    backend: Annotated[VariantSection, VariantOf("rollout_engine", default="vllm", where=_colocated,
                                                 why="the server runs a colocated engine")] = "vllm"
    """The engine the server runs, with its own knobs (`{name: vllm, gpu_memory_utilization: 0.9}`
    or `transformers`)."""
    address: str | None = None
    """`host:port` of a server started with `urlvr serve` (its key in the environment variable
    URLVR_SERVER_KEY on both sides); null = urlvr starts one beside the trainer, on this node,
    and stops it when the run ends."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM's tensor parallelism inside the server (GPUs the server spans); vllm backend only."""
    devices: str | None = None
    """CUDA_VISIBLE_DEVICES of a server urlvr starts (`"0,1"`: the trainer ranks then take the
    other GPUs); null = inherit the trainer's environment."""
    threads: int | None = Field(None, ge=1)
    """CPU threads of a server urlvr starts (torch.set_num_threads); null = torch's default."""
    startup_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for the server to load its model and answer (vLLM on CPU takes minutes)."""
    request_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for one request's groups, or one weight broadcast, before the run stops with
    an error naming the server's state (a hung server never hangs the run)."""
    sync_bucket_mb: int = Field(256, ge=1)
    """Weights move in buckets of this many MiB (one broadcast per bucket and dtype)."""

    overlaps_training: ClassVar[bool] = True  # samples from its own copy, in another process

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, address: str | None) -> str | None:
        if address is not None:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port (e.g. 10.0.0.5:8765)")
        return address

    @model_validator(mode="after")
    def _backend_fits(self) -> ServerEngineSection:
        inert = [knob for knob in _COLOCATED_ONLY if knob in type(self.backend).model_fields and self.backend.changed(knob)]
        if inert:
            raise ValueError(f"backend.{inert[0]} does nothing in a server ({_COLOCATED_ONLY[inert[0]]}): drop it")
        kwargs = getattr(self.backend, "kwargs", None)
        if self.tensor_parallel_size > 1 and kwargs is None:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size}: the {self.backend.name} backend has "
                             "no tensor parallelism; use backend: vllm")
        if kwargs and "tensor_parallel_size" in kwargs:
            raise ValueError("backend.kwargs.tensor_parallel_size: set rollout.engine.tensor_parallel_size instead")
        return self


@ROLLOUT_ENGINES.register("server")
class ServerRolloutEngine:
    """The trainer's side of a generation server: one connection per rank; rank 0 also owns the
    weight channel (and the server process, when urlvr started it)."""

    settings = ServerEngineSection
    uses_trainer_module = False

    def __init__(self, connection: Connection, dist: DistInfo, options: ServerEngineSection, *,
                 store_port: int, host: str, process: subprocess.Popen | None, log_path: Path | None) -> None:
        self.connection, self.dist, self.options = connection, dist, options
        self.process, self.log_path = process, log_path
        self.version = -1  # the last version pushed (0 = the trainer's start)
        self._next_id, self._answers, self._requested = 0, {}, {}  # tickets: answers kept, (version, count) asked
        self._confirmed_layout = None  # the sync layout the server accepted (checked once per run)
        # every answer is read as soon as it arrives, whatever the trainer is doing: a server blocked on
        # sending an answer larger than the socket buffers (a step's groups: megabytes) while the trainer
        # waits in the weight broadcast for that server would be a deadlock
        self._inbox: queue.Queue[tuple] = queue.Queue()
        threading.Thread(target=_read_forever, args=(connection, self._inbox), daemon=True).start()
        self.channel = None
        if dist.is_main:
            session = secrets.token_hex(8)
            self._send(("channel", session))
            self._await("channel", "the weight channel")  # the server's consent, before the group forms
            store = td.TCPStore(host, store_port, None, False, datetime.timedelta(seconds=options.startup_timeout_s))
            self.channel = WeightChannel(store, session, TRAINER, options.request_timeout_s)
        if process is not None:
            weakref.finalize(self, _stop, process)

    @classmethod
    def from_recipe(cls, recipe, model: torch.nn.Module, tokenizer, dist: DistInfo) -> ServerRolloutEngine:
        options: ServerEngineSection = recipe.rollout.engine
        process = log_path = None
        if options.address is None:
            if int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)) < dist.world_size:
                raise GenerationServerError("rollout.engine: a server urlvr starts listens on one node's loopback, and "
                                            "this run spans several nodes: start `urlvr serve` yourself and set "
                                            "rollout.engine.address (docs/async.md)")
            if options.backend.name == "vllm" and importlib.util.find_spec("vllm") is None:  # here, not in the server's log
                raise RecipeError(f"rollout.engine.backend vllm: {MISSING_VLLM}")
            launched = launch_server(recipe, Path(recipe.output_dir) / "server") if dist.is_main else None
            process, address, key, log_path = launched if launched else (None, None, None, None)
            address, key = all_gather_objects([(address, key)])[0]  # rank 0's server, for every rank
        else:
            address, key = options.address, _attach_key(options.address)
        connection, hello = connect(address, key, options.startup_timeout_s, process, log_path)
        if options.changed("backend") and hello.get("backend") and hello["backend"] != options.backend.name:
            _hang_up(connection)
            raise GenerationServerError(f"the generation server at {address} runs the {hello['backend']} backend, the "
                                        f"recipe names {options.backend.name} (rollout.engine.backend): attach to the "
                                        "server it names, or drop the field")
        host = address.rsplit(":", 1)[0]
        try:
            engine = cls(connection, dist, options, store_port=hello["store_port"], host=host, process=process,
                         log_path=log_path)
            engine.push_weights(model, version=0)  # the server samples the trainer's weights, whatever it loaded
        except BaseException:  # a refused or failed start leaves the server free (and stops one urlvr started)
            _hang_up(connection)
            if process is not None:
                _stop(process)
            raise
        return engine

    # ------------------------------------------------------------------ the protocol
    def generate(self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams) -> list[Group]:
        """Sampled by the version last pushed (evaluation, probes, rewards that ask the policy)."""
        return self.collect(self.submit(prompts, group_size, sampling, self.version)).groups

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.push_weights(model, self.version + 1)

    def offload(self) -> None:
        """Nothing to free: the server holds its memory on its own devices."""

    # ------------------------------------------------------------------ overlap
    def submit(self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams, version: int) -> int:
        """Send a request to be sampled by policy `version`; returns its ticket at once."""
        check_generate_request(prompts, group_size, sampling)
        ticket, self._next_id = self._next_id, self._next_id + 1
        self._send(("generate", ticket, list(prompts), group_size, sampling, version))
        self._requested[ticket] = (version, len(prompts))
        return ticket

    def collect(self, ticket: int) -> Served:
        """Wait for `ticket`'s groups (at most `request_timeout_s`). GenerationServerError when the
        server answers with an error, another version than the request's, or the wrong count."""
        started = time.monotonic()
        while ticket not in self._answers:
            answer = self._receive(f"request {ticket}")
            self._answers[answer[1]] = answer
        answer = self._answers.pop(ticket)
        version, count = self._requested.pop(ticket)
        if answer[0] == "error":
            raise GenerationServerError(f"the generation server failed request {ticket}: {answer[2]}{self._log_hint()}")
        _, _, groups, served, idle, generate_s = answer
        if served != version or len(groups) != count:
            raise GenerationServerError(f"the generation server answered request {ticket} with {len(groups)} groups of "
                                        f"policy version {served}; it asked for {count} of version {version}")
        return Served([replace(g, policy_version=served) for g in groups], served, time.monotonic() - started, idle,
                      generate_s)

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """Make the server serve `model`'s weights as policy `version`. Collective: every rank
        gathers each bucket under ZeRO-3; rank 0 broadcasts it to the server."""
        dtype = next(model.parameters()).dtype
        bucket_bytes = self.options.sync_bucket_mb * 2**20
        weights = iter_weights(model, bucket_bytes=bucket_bytes, dtype=dtype, device="cpu")
        if self.channel is None:  # not rank 0: take part in the gathers, send nothing
            for _ in weights:
                pass
        else:
            layout = [[TensorSpec(name, tuple(getattr(p, "ds_shape", p.shape)), dtype) for name, p in bucket]
                      for bucket in parameter_buckets(model, bucket_bytes)]
            # the server checks the layout against its model before any weight moves; the trainer waits for
            # that go-ahead once (a run's layout never changes): later syncs are broadcast in the background
            # while the server may still be generating, so the trainer never waits for a generation here
            confirm = layout != self._confirmed_layout
            try:
                self.channel.finish()  # the previous version's broadcast: the server has taken it
                self._send(("sync", version, layout, confirm))
                if confirm:
                    self._await("sync", f"the weight sync of version {version}")
                    self._confirmed_layout = layout
                self.channel.send(layout, weights)
            except RuntimeError as err:  # gloo's timeout or a closed peer
                exited = self.process is not None and self.process.poll() is not None
                reason = f"the server exited (code {self.process.returncode})" if exited else str(err).split(". ")[0]
                raise GenerationServerError(f"the weight sync to the generation server failed (version {version}, "
                                            f"timeout {format_seconds(self.options.request_timeout_s)}): {reason}"
                                            f"{self._log_hint()}") from None
        self.version = version

    def close(self) -> None:
        """Stop a server urlvr started (a server the user started keeps running, free for the next
        run). Idempotent. The last weights go out first: a user's server takes them whole (not a
        broadcast cut off by the hang-up), within the channel's timeout."""
        if self.channel is not None and not self.connection.closed:
            try:
                self.channel.finish(timeout_s=_CLOSE_WAIT_S)
            except RuntimeError:  # the server is gone or hung: nothing more to hand it
                pass
        if self.process is not None:
            try:
                self.connection.send(("stop",))
            except OSError:
                pass
        _hang_up(self.connection)
        if self.process is not None:
            _stop(self.process)

    # ------------------------------------------------------------------ the connection
    def _send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except OSError as err:
            raise GenerationServerError(f"the generation server closed the connection ({err}){self._log_hint()}") from None

    def _receive(self, what: str) -> tuple:
        timeout, started = self.options.request_timeout_s, time.monotonic()
        while True:
            try:
                answer = self._inbox.get(timeout=_POLL_S)
            except queue.Empty:
                answer = None
            if answer is not None:
                if answer[0] == _CLOSED:
                    self._inbox.put(answer)  # every later wait fails the same way
                    raise GenerationServerError(f"the generation server closed the connection while the trainer "
                                                f"waited for {what} ({answer[1]}){self._log_hint()}")
                if answer[0] == "error" and not isinstance(answer[1], int):  # a failed sync or channel
                    failed = {"channel": "refused this trainer", "sync": "failed a weight sync"}.get(answer[1], answer[1])
                    raise GenerationServerError(f"the generation server {failed}: {answer[2]}{self._log_hint()}")
                return answer
            if self.process is not None and self.process.poll() is not None:
                raise GenerationServerError(f"the generation server exited (code {self.process.returncode}) while the "
                                            f"trainer waited for {what}{self._log_hint()}")
            if time.monotonic() - started > timeout:
                raise GenerationServerError(f"the generation server did not answer {what} within "
                                            f"{format_seconds(timeout)} (rollout.engine.request_timeout_s): hung or "
                                            f"overloaded{self._log_hint()}")

    def _await(self, kind: str, what: str) -> None:
        """Wait for the server's go-ahead (`(kind, ...)`), keeping the groups that arrive meanwhile."""
        while True:
            answer = self._receive(what)
            if answer[0] == kind:
                return
            self._answers[answer[1]] = answer

    def _log_hint(self) -> str:
        return server_log_hint(self.log_path)


_CLOSED = "closed"  # what the reader puts in the inbox when the connection ends


def _hang_up(connection: Connection) -> None:
    """End the connection for both sides now. A plain close() would not: the reader thread's
    blocked recv keeps the socket open, and a server the user started would still count this run
    as the one that holds its weights."""
    if connection.closed:
        return
    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already reset by the server
        pass
    connection.close()


def _read_forever(connection: Connection, inbox: queue.Queue) -> None:
    """Move the server's answers into `inbox` as they arrive, until the connection ends."""
    while True:
        try:
            inbox.put(connection.recv())
        except (EOFError, OSError) as err:
            inbox.put((_CLOSED, type(err).__name__))
            return


# --------------------------------------------------------------------------- starting and reaching a server
def launch_server(recipe, folder: Path) -> tuple[subprocess.Popen, str, str, Path]:
    """Start `urlvr serve` for `recipe` on this node: (process, address, key, log file). The
    server stops itself when this process ends (its connections close, or its parent is gone)."""
    options: ServerEngineSection = recipe.rollout.engine
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path, log_path = folder / "recipe.yaml", folder / "server.log"
    recipe_path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    port, key = free_port(), secrets.token_hex(16)
    # the server imports what the trainer can (the recipe's plugins among them)
    env = {**os.environ, KEY_VARIABLE: key, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not a trainer rank
        env.pop(name, None)
    if options.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = options.devices
    command = [sys.executable, "-m", "urlvr.cli", "serve", str(recipe_path), "--host", "127.0.0.1", "--port",
               str(port), "--exit-with-clients", "--parent-pid", str(os.getpid())]
    if options.threads is not None:
        command += ["--threads", str(options.threads)]
    print(f"urlvr: starting the generation server ({options.backend.name}); its log: {log_path}", file=sys.stderr,
          flush=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, f"127.0.0.1:{port}", key, log_path


def connect(address: str, key: str, timeout_s: float, process: subprocess.Popen | None = None,
            log_path: Path | None = None) -> tuple[Connection, dict]:
    """Connect and shake hands, retrying while the server starts (a line every 30 s); returns
    (connection, the server's hello). GenerationServerError when it does not answer within
    `timeout_s`, exits first, or speaks another protocol."""
    host, port = _split_address(address)
    started, said = time.monotonic(), 0.0
    while True:
        try:
            connection = _client((host, port), key, timeout_s, address)
            break
        except AuthenticationError:
            raise GenerationServerError(f"the generation server at {address} refused the key ({KEY_VARIABLE})") from None
        except OSError:
            waited = time.monotonic() - started
            if process is not None and process.poll() is not None:
                raise GenerationServerError(f"the generation server exited (code {process.returncode}) before it "
                                            f"answered{server_log_hint(log_path)}") from None
            if waited > timeout_s:
                raise GenerationServerError(f"no generation server answered at {address} within "
                                            f"{format_seconds(timeout_s)} (rollout.engine.startup_timeout_s)"
                                            f"{server_log_hint(log_path)}") from None
            if waited - said >= 30:
                said = waited
                print(f"urlvr: waiting for the generation server at {address} ({format_seconds(waited)})",
                      file=sys.stderr, flush=True)
            time.sleep(_POLL_S)
    connection.send(("hello", PROTOCOL))
    if not connection.poll(timeout_s):
        raise GenerationServerError(f"the generation server at {address} accepted the connection but did not answer "
                                    f"within {format_seconds(timeout_s)}{server_log_hint(log_path)}")
    kind, hello = connection.recv()
    if hello.get("protocol") != PROTOCOL:
        raise GenerationServerError(f"the generation server at {address} speaks protocol {hello.get('protocol')}, "
                                    f"this urlvr {PROTOCOL}: run the same urlvr on both sides")
    return connection, hello


def _client(host_port: tuple[str, int], key: str, timeout_s: float, address: str) -> Connection:
    """`multiprocessing.connection.Client` with a bound on the key exchange, which has none of its
    own: a process that accepts connections but never answers (not a urlvr server, or a hung one)
    would block the run forever. The exchange runs in a thread the wait gives up on."""
    outcome: list = []

    def attempt() -> None:
        try:
            outcome.append(Client(host_port, authkey=key.encode()))
        except BaseException as err:  # handed to the caller as it is
            outcome.append(err)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise GenerationServerError(f"{address} accepted the connection but did not complete urlvr's handshake within "
                                    f"{format_seconds(timeout_s)}: is it a urlvr server, and is it responsive?")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


_SERVER_ERROR = re.compile(r"urlvr: (error|\w*(Error|Exception)): ")  # `urlvr serve`'s last word when it fails (cli.py)


def server_log_hint(log_path: Path | None, lines: int = 5) -> str:
    """`; its log (path) ends: ...` with the last lines of a started server's log, else ''. The
    server's own error line comes first when the tail has moved past it (vLLM logs its shutdown
    after urlvr's error: the tail alone would hide the cause)."""
    if log_path is None or not log_path.is_file():
        return ""
    text = log_path.read_text(errors="replace").strip().splitlines()
    tail = text[-lines:]
    said = next((line for line in reversed(text) if _SERVER_ERROR.match(line)), None)
    cause = f"; it stopped with {said.removeprefix('urlvr: ')}" if said is not None and said not in tail else ""
    return cause + (f"; its log ({log_path}) ends:\n  " + "\n  ".join(tail) if tail else f"; its log: {log_path}")


def _attach_key(address: str) -> str:
    key = os.environ.get(KEY_VARIABLE)
    if not key and _split_address(address)[0] in ("127.0.0.1", "localhost", "::1"):
        return LOCAL_KEY
    if not key:
        raise GenerationServerError(f"rollout.engine.address is set: give the server's key in {KEY_VARIABLE} (the "
                                    "same value `urlvr serve` was started with)")
    return key


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise GenerationServerError(f"rollout.engine.address {address!r} is not host:port")
    return host, int(port)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
