"""The generation server: a rollout engine in a process (and on devices) of its own.

`urlvr serve RECIPE` runs it (commands/serve.py loads the model and builds the backend engine,
`rollout.engine.backend`: vllm or transformers); `rollout.engine: server` in a trainer starts
one or attaches to one (rollout/server_engine.py). The trainer ranks each open a connection
(``multiprocessing.connection``, HMAC-authenticated with a shared key) and send:

- ``generate``: whole groups of one rank's prompts, with the policy version the trainer expects
  them to be sampled by. The server answers each request in order with the groups, tagged with
  the version it served. A request for a newer version than the server holds waits for that
  sync (another rank may send before rank 0 has synced); one for an older version is an error,
  never silently sampled by another policy.
- ``channel``: rank 0 opens the weight channel (rollout/weight_channel.py, gloo).
- ``sync``: a version number and the layout of the broadcast that follows; the server receives
  the weights into the backend, then serves that version.

One request at a time, in arrival order: a sync that arrives during a generation waits for it,
which is what bounds the staleness to the trainer's `max_staleness`. Each reply says how long
the server sat idle before the request came (`async/server_idle_s`): the time since its last
generation ended, less the time it spent loading weights. Waiting for a sync is idleness too:
with k = 0 the server waits out every update, with k = 1 whatever of it outlasts a generation.

A sync's layout (names, shapes, dtypes) is checked against the served model before any weight
moves. The trainer waits for that go-ahead on its first sync only (the layout of a run never
changes); later syncs are broadcast in the background while the server may still be generating,
and a later refusal still takes the broadcast, so the trainer hears why instead of timing out.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge, wait

import torch
import torch.distributed as td

from urlvr.lifeline import wait_until_gone
from urlvr.rollout.base import RolloutEngine
from urlvr.rollout.weight_channel import SERVER, TensorSpec, WeightChannel

PROTOCOL = 2  # bumped when a message changes shape: a trainer and a server of other versions refuse each other
HANDSHAKE_TIMEOUT_S = 120.0  # a connection that has not completed the key exchange by then is dropped


@dataclass
class ServerState:
    """What the server holds between requests."""

    backend: RolloutEngine
    load_weights: Callable[[Iterator[tuple[str, torch.Tensor]]], None]
    store: td.TCPStore
    version: int = -1  # no sync yet: every generate waits for the first one (version 0 = the trainer's start)
    channel: WeightChannel | None = None
    owner: Connection | None = None  # the connection (trainer rank 0) whose weights the server serves
    shapes: dict[str, tuple[int, ...]] | None = None  # every parameter name of the served model -> its shape
    model: str = "?"  # what the server loaded (for messages)
    backend_name: str = ""  # the backend it runs (told to every trainer that connects)
    deferred: list[tuple[Connection, tuple]] = field(default_factory=list)
    # when the last generation ended (at first: when the server was ready), moved on by each weight load's
    # duration, so that `now - idle_since` is the time spent waiting, for the weights or for a request
    idle_since: float = field(default_factory=time.monotonic)
    sync_timeout_s: float = 600.0

    def release(self) -> None:
        """The owning run is gone: its policy is nobody's, and the next run pushes its own first."""
        self.owner, self.channel, self.version = None, None, -1


def serve(listener: Listener, state: ServerState, *, key: bytes, exit_with_clients: bool,
          parent_pid: int | None = None, log: Callable[[str], None] = print) -> None:
    """Answer requests until told to stop: when `exit_with_clients`, once every connection that
    was opened has closed (the trainer ended, or died: a kill -9 closes its sockets) or the
    parent process is gone. `listener` has no authkey of its own: each connection proves `key`
    in a thread of its own (`_admit`)."""
    accepted: queue.Queue[Connection] = queue.Queue()
    threading.Thread(target=_accept_forever, args=(listener, key, accepted, log), daemon=True).start()
    if exit_with_clients and parent_pid is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid, log), daemon=True).start()
    connections: list[Connection] = []
    ever_connected = False
    while True:
        while not accepted.empty():
            connections.append(accepted.get())
            ever_connected = True
        if exit_with_clients and ((ever_connected and not connections) or _orphaned(parent_pid)):
            log("urlvr serve: the trainer is gone; stopping")
            return
        ready = wait(connections, timeout=0.2)
        for conn in sorted(ready, key=connections.index):  # a dead trainer's end before its successor's start
            try:
                message = conn.recv()
            except (EOFError, OSError):
                connections.remove(conn)
                state.deferred = [(c, m) for c, m in state.deferred if c is not conn]
                if conn is state.owner:
                    state.release()
                    log("urlvr serve: the trainer that owned the weights left; waiting for the next one's")
                continue
            if message[0] == "stop":
                log("urlvr serve: stopped by the trainer")
                return
            _handle(conn, message, state, log)
        _run_deferred(state, log)


def _accept_forever(listener: Listener, key: bytes, accepted: queue.Queue, log: Callable[[str], None]) -> None:
    """Accept connections and hand each to its own key exchange: a client with a wrong key, or
    one that connects and says nothing (a port scanner, a health check), must not stop or block
    the acceptance of the next trainer (Listener(authkey=...) runs the exchange inside accept)."""
    while True:
        try:
            conn = listener.accept()
        except OSError:  # a connection reset before it was accepted
            continue
        threading.Thread(target=_admit, args=(conn, key, listener.last_accepted, accepted, log), daemon=True).start()


def _admit(conn: Connection, key: bytes, peer, accepted: queue.Queue, log: Callable[[str], None]) -> None:
    """`conn` into `accepted` once it proved the key (both ways, as `Listener` would), within
    HANDSHAKE_TIMEOUT_S; else it is closed and the refusal logged."""
    guard = socket.socket(fileno=os.dup(conn.fileno()))  # to end a blocked read from the timer thread
    done = threading.Event()
    timer = threading.Timer(HANDSHAKE_TIMEOUT_S, lambda: done.is_set() or guard.shutdown(socket.SHUT_RDWR))
    timer.start()
    try:
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
        done.set()
    except (AuthenticationError, OSError, EOFError) as err:
        reason = "a wrong key" if isinstance(err, AuthenticationError) else f"no key exchange ({type(err).__name__})"
        log(f"urlvr serve: refused a connection from {peer}: {reason}")
        conn.close()
        return
    finally:
        timer.cancel()
        guard.close()
    accepted.put(conn)


def _exit_when_orphaned(parent_pid: int, log: Callable[[str], None]) -> None:
    """End this server within a second of its trainer's death, whatever it is doing: the main loop
    only notices between requests, and a long generation (minutes) would hold the devices a
    resumed run's new server needs. A server urlvr started leads a session of its own
    (`launch_server`): its children (vLLM's engine processes) go with it."""
    wait_until_gone([parent_pid])
    log("urlvr serve: the trainer is gone; stopping now")
    if os.getsid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _orphaned(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


def _handle(conn: Connection, message: tuple, state: ServerState, log: Callable[[str], None]) -> None:
    kind = message[0]
    try:
        if kind == "hello":
            _, protocol = message
            conn.send(("hello", {"protocol": PROTOCOL, "version": state.version, "store_port": state.store.port,
                                 "pid": os.getpid(), "backend": state.backend_name}))
        elif kind == "channel":
            _, session = message
            if state.owner is not None and state.owner is not conn and _hung_up(state.owner):
                state.release()  # the owner's end arrived after its successor's request: a finished run, not a rival
            if state.owner is not None and state.owner is not conn:
                raise Refused("another training run holds this server's weights (one run per server: the policy "
                              "versions of two runs would mix); stop that run, or start another server")
            _reply(conn, ("channel", "open"))  # before the group forms: a refusal is an answer, not a timeout
            state.channel = WeightChannel(state.store, session, SERVER, state.sync_timeout_s)
            state.owner = conn
        elif kind == "sync":
            _, version, layout, confirm = message
            if state.channel is None or conn is not state.owner:
                raise Refused("a weight sync from a connection that does not hold the weight channel")
            mismatch = layout_mismatch(layout, state.shapes)
            if mismatch:
                if not confirm:  # the trainer is already broadcasting: take it, then say why
                    _drain(state.channel.receive(layout))
                raise Refused(f"the trainer's model does not fit this server's ({state.model}): {mismatch}")
            if confirm:
                _reply(conn, ("sync", "ready"))  # the trainer broadcasts only into a load that can take it
            started, state.version = time.monotonic(), -1  # a half-loaded policy is nobody's: serve none until done
            _load(state, layout)
            state.version = version
            loading = time.monotonic() - started
            log(f"urlvr serve: serving policy version {version} (sync {loading:.1f} s)")
            state.idle_since += loading  # busy, not idle; the wait before the sync stays counted
        elif kind == "generate":
            if message[-1] > state.version:  # its sync is still to come (from rank 0): answer it then
                state.deferred.append((conn, message))
            else:
                _generate(conn, message, state)
        else:
            raise ValueError(f"unknown request {kind!r}")
    except Refused as err:
        log(f"urlvr serve: refused a {kind}: {err}")
        _reply(conn, ("error", message[1] if kind == "generate" else kind, str(err)))
    except Exception as err:  # the trainer gets the reason; the server stays up for the next request
        log(f"urlvr serve: {kind} failed: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        _reply(conn, ("error", message[1] if kind == "generate" else kind, f"{type(err).__name__}: {err}"))


def _hung_up(conn: Connection) -> bool:
    """Whether the peer of `conn` has closed it, read without taking a message off it (a peek)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:  # open, nothing to read
        return False
    except OSError:  # reset or already closed
        return True


class Refused(Exception):
    """A request the server declines on purpose: its message goes to the trainer as it is."""


def layout_mismatch(layout: list[list[TensorSpec]], shapes: dict[str, tuple[int, ...]] | None) -> str | None:
    """What keeps a sync of `layout` from loading into a model whose parameters have `shapes`
    (every name, tied names included, as `weight_sync` sends them), or None when it fits."""
    if shapes is None:
        return None
    sent = {spec.name: tuple(spec.shape) for bucket in layout for spec in bucket}
    for name, shape in sent.items():
        if name not in shapes:
            return f"it sends {name!r}, which the server's model does not have"
        if tuple(shapes[name]) != shape:
            return f"{name} is {list(shape)} in the trainer, {list(shapes[name])} in the server"
    missing = [name for name in shapes if name not in sent]
    if missing:
        return f"it sends no {missing[0]!r} ({len(missing)} of the server's weights would stay as they are)"
    return None


def _load(state: ServerState, layout: list[list[TensorSpec]]) -> None:
    """Receive a sync into the backend. A load that fails part-way still takes the rest of the
    broadcast, so that the trainer's send completes and it hears the reason (not a timeout)."""
    received = state.channel.receive(layout)
    try:
        state.load_weights(received)
    except Exception:
        _drain(received)
        raise


def _drain(received: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Take the rest of a broadcast without loading it: the trainer's send completes, and it hears why."""
    for _ in received:
        pass


def _generate(conn: Connection, message: tuple, state: ServerState) -> None:
    _, request_id, prompts, group_size, sampling, version = message
    if version != state.version:
        _reply(conn, ("error", request_id, f"the request wants policy version {version}, the server serves "
                                           f"{state.version}: a weight sync the trainer did not expect"))
        return
    idle = time.monotonic() - state.idle_since
    started = time.monotonic()
    groups = state.backend.generate(prompts, group_size, sampling)
    _reply(conn, ("groups", request_id, groups, state.version, idle, time.monotonic() - started))
    state.idle_since = time.monotonic()


def _run_deferred(state: ServerState, log: Callable[[str], None]) -> None:
    ready = [(c, m) for c, m in state.deferred if m[-1] <= state.version]
    state.deferred = [(c, m) for c, m in state.deferred if m[-1] > state.version]
    for conn, message in ready:
        _handle(conn, message, state, log)


def _reply(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:  # the trainer went away mid-request: nothing to answer
        print("urlvr serve: a trainer connection closed before its answer", file=sys.stderr)
