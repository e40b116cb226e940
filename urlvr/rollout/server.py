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
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge, wait

import torch
import torch.distributed as td

from urlvr.rollout.base import RolloutEngine
from urlvr.rollout.weight_channel import SERVER, WeightChannel

PROTOCOL = 1  # bumped when a message changes shape: a trainer and a server of other versions refuse each other


@dataclass
class ServerState:
    """What the server holds between requests."""

    backend: RolloutEngine
    load_weights: Callable[[Iterator[tuple[str, torch.Tensor]]], None]
    store: td.TCPStore
    version: int = -1  # no sync yet: every generate waits for the first one (version 0 = the trainer's start)
    channel: WeightChannel | None = None
    deferred: list[tuple[Connection, tuple]] = field(default_factory=list)
    # when the last generation ended (at first: when the server was ready), moved on by each weight load's
    # duration, so that `now - idle_since` is the time spent waiting, for the weights or for a request
    idle_since: float = field(default_factory=time.monotonic)
    sync_timeout_s: float = 600.0
    check_layout: Callable[[list], None] | None = None  # ValueError when a sync's layout does not fit the model
    backend_name: str = ""


def serve(listener: Listener, key: bytes, state: ServerState, *, exit_with_clients: bool,
          parent_pid: int | None = None, log: Callable[[str], None] = print) -> None:
    """Answer requests until told to stop: when `exit_with_clients`, once every connection that
    was opened has closed (the trainer ended, or died: a kill -9 closes its sockets) or the
    parent process is gone. `listener` takes no key itself: each connection proves `key` in a
    thread of its own, so a client with the wrong key, or one that never answers, holds up
    nobody else."""
    accepted: queue.Queue[Connection] = queue.Queue()
    threading.Thread(target=_accept_forever, args=(listener, key, accepted, log), daemon=True).start()
    connections: list[Connection] = []
    ever_connected = False
    while True:
        while not accepted.empty():
            connections.append(accepted.get())
            ever_connected = True
        if exit_with_clients and ((ever_connected and not connections) or _orphaned(parent_pid)):
            log("urlvr serve: the trainer is gone; stopping")
            return
        for conn in wait(connections, timeout=0.2):
            try:
                message = conn.recv()
            except (EOFError, OSError):
                connections.remove(conn)
                state.deferred = [(c, m) for c, m in state.deferred if c is not conn]
                continue
            if message[0] == "stop":
                log("urlvr serve: stopped by the trainer")
                return
            _handle(conn, message, state, log)
        _run_deferred(state, log)


def _accept_forever(listener: Listener, key: bytes, accepted: queue.Queue, log: Callable[[str], None]) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:  # a connection reset before it was accepted
            continue
        threading.Thread(target=_admit, args=(conn, key, accepted, log), daemon=True).start()


def _admit(conn: Connection, key: bytes, accepted: queue.Queue, log: Callable[[str], None]) -> None:
    """The key exchange of `multiprocessing.connection` (the server's half of `Listener.accept`),
    then the connection joins the served ones; a wrong key or a broken peer is refused and logged."""
    try:
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
    except Exception as err:  # AuthenticationError, EOFError, OSError: this connection only
        log(f"urlvr serve: refused a connection ({type(err).__name__}: {err})")
        conn.close()
        return
    accepted.put(conn)


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
            state.channel = WeightChannel(state.store, session, SERVER, state.sync_timeout_s)
        elif kind == "sync":
            _, version, layout = message
            if state.channel is None:
                raise RuntimeError("a sync before the weight channel was opened")
            started = time.monotonic()
            received = state.channel.receive(layout)
            try:
                if state.check_layout is not None:
                    state.check_layout(layout)
                state.load_weights(received)
            except Exception:
                for _ in received:  # take the rest of the broadcast, so the trainer's send completes and it hears why
                    pass
                raise
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
    except Exception as err:  # the trainer gets the reason; the server stays up for the next request
        log(f"urlvr serve: {kind} failed: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        _reply(conn, ("error", message[1] if kind == "generate" else kind, f"{type(err).__name__}: {err}"))


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
