"""`urlvr serve RECIPE`: run a generation server for a trainer with `rollout.engine: server`.

The server runs the recipe's `rollout.engine.backend` (or, for a recipe with a colocated engine,
that engine) on this process's devices, and answers trainers until stopped (rollout/server.py).
A trainer starts one itself by default; start one yourself to put it on other devices or another
node (`rollout.engine.address`, docs/async.md). The key that trainers must present is read from
URLVR_SERVER_KEY; a server bound beyond this machine (`--host 0.0.0.0`) refuses to start without one.
"""

from __future__ import annotations

import datetime
import errno
import os
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Listener
from pathlib import Path

import torch
import torch.distributed as td

from urlvr.dist import DistInfo
from urlvr.errors import RecipeError
from urlvr.recipe import load_recipe
from urlvr.rollout.base import ROLLOUT_ENGINES
from urlvr.rollout.server import ServerState, serve
from urlvr.rollout.server_engine import KEY_VARIABLE, LOCAL_KEY
from urlvr.trainer.build import load_model_and_tokenizer

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_server(recipe_path: str | Path, *, host: str, port: int, key: str | None, overrides: list[str] | None = None,
               threads: int | None = None, exit_with_clients: bool = False, parent_pid: int | None = None) -> None:
    """Load the model, build the backend engine, listen on host:port until stopped."""
    if not key:
        if host not in _LOOPBACK:
            raise RecipeError(f"--host {host}: a server reachable from other machines needs a key: set {KEY_VARIABLE}")
        key = LOCAL_KEY
    recipe = load_recipe(recipe_path, overrides or ())
    listener = listen(host, port)  # a bad or busy address fails now, not after minutes of model loading
    engine = recipe.rollout.engine
    backend = getattr(engine, "backend", engine)  # a server recipe names its backend; a colocated one is its own
    options = engine if backend is not engine else None
    # one recipe may serve both sides: its server knobs act here too (before anything touches CUDA)
    threads = threads or (options.threads if options else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if options is not None and options.devices is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = options.devices
    if options is not None and options.tensor_parallel_size > 1:
        backend = backend.model_copy(update={"kwargs": {**backend.kwargs,
                                                        "tensor_parallel_size": options.tensor_parallel_size}})
    started = time.monotonic()
    say(f"urlvr serve: loading {recipe.model.path} for the {backend.name} backend")
    model, tokenizer = load_model_and_tokenizer(recipe)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}  # what a sync must fill
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    backend_class = ROLLOUT_ENGINES.get(backend.name)
    if backend_class.uses_trainer_module:  # it samples from this module; one with its own copy (vLLM) leaves it on the host
        model.to(device)
    backend_engine = backend_class.from_recipe(
        recipe.model_copy(update={"rollout": recipe.rollout.model_copy(update={"engine": backend})}), model,
        tokenizer, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    load = getattr(backend_engine, "load_weights", None) or (lambda weights: copy_into(model, weights))
    timeout = datetime.timedelta(seconds=options.request_timeout_s if options else 900)
    store = td.TCPStore(host, 0, None, True, timeout=timeout, wait_for_workers=False)
    state = ServerState(backend_engine, load, store, sync_timeout_s=options.request_timeout_s if options else 900.0,
                        shapes=shapes, model=str(recipe.model.path), backend_name=backend.name)
    with listener:
        say(f"urlvr serve: ready on {host}:{listener.address[1]} after {time.monotonic() - started:.0f} s "
            f"(weights channel on port {store.port}, pid {os.getpid()})")
        try:
            serve(listener, state, key=key.encode(), exit_with_clients=exit_with_clients, parent_pid=parent_pid,
                  log=say)
        except KeyboardInterrupt:  # Ctrl-C ends a server the user started: nothing to resume
            say("urlvr serve: interrupted; stopped")


def listen(host: str, port: int) -> Listener:
    """A listener on host:port (the key exchange runs per connection: rollout/server.py).
    RecipeError naming the address when it cannot be had (a port in use, out of range, an
    unknown host)."""
    if not 0 <= port < 65536:
        raise RecipeError(f"--port {port}: a port is 0-65535 (0 = any free one)")
    try:
        return Listener((host, port))
    except OSError as err:
        reason = err.strerror or str(err)
        hint = ": another server runs there? pick another --port, or 0 for any free one" if \
            err.errno == errno.EADDRINUSE else ""
        raise RecipeError(f"serve: cannot listen on {host}:{port} ({reason}){hint}") from None


def copy_into(model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy `(checkpoint name, tensor)` pairs into `model`'s parameters of those names (a tied
    weight arrives under each of its names and is copied each time). KeyError naming a name the
    model does not have: the two sides load different models."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"the trainer sent {name!r}, which the server's model does not have (another model?)")
            params[name].copy_(tensor)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

