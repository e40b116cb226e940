"""`model.path` to a folder transformers (and vLLM) can load.

- `urlvr/tiny`, `urlvr/tiny-aligned`: the embedded tiny models (urlvr/models/tiny.py);
- `urlvr/smollm2-135m-instruct`, `urlvr/gemma3-270m`: GGUF files from PyPI packages (pypi.py);
- a `.gguf` file, or a folder holding one and no config.json: dequantised once (gguf.py);
- anything else (an HF folder, a hub id) unchanged.
"""

from __future__ import annotations

from pathlib import Path

from urlvr.errors import RecipeError
from urlvr.models.gguf import dequantise_gguf, find_gguf
from urlvr.models.pypi import PYPI_MODELS, resolve_pypi_model
from urlvr.models.tiny import ALIGNED_MODEL_ALIAS, TINY_MODEL_ALIAS
from urlvr.models.tiny import resolve_model_path as resolve_tiny

ALIASES = (TINY_MODEL_ALIAS, ALIGNED_MODEL_ALIAS, *PYPI_MODELS)


def resolve_model_path(path: str) -> str:
    """A loadable folder or hub id for `path` (see the module docstring); GGUF sources are
    dequantised into the cache on first use (a minute on CPU, with progress lines)."""
    if path.startswith("urlvr/") and path not in ALIASES:  # no such hub namespace: a typo
        raise RecipeError(f"model.path {path!r}: unknown urlvr model; known: {', '.join(ALIASES)}")
    if path in PYPI_MODELS:
        return str(resolve_pypi_model(path))
    gguf = find_gguf(path)
    if gguf is not None:
        return str(dequantise_gguf(gguf))
    return resolve_tiny(path)


def checked_model_path(path: str) -> str:
    """`resolve_model_path(path)`, refused in one line when it cannot name a model: a file, a
    folder without config.json, a local-looking path that does not exist. Hub ids pass unchecked
    (they are checked by the download). Commands that run several models (`urlvr mcs`,
    `urlvr probe`) call it for every model before any work or deletion.

    Raises RecipeError naming `path`."""
    resolved = resolve_model_path(path)
    local = Path(resolved).expanduser()
    if local.is_file():
        raise RecipeError(f"model.path {path!r}: is a file, not a model folder (a folder saved "
                          "by save_pretrained: config.json, weights, tokenizer files; or a .gguf file)")
    if local.is_dir() and not (local / "config.json").is_file():
        raise RecipeError(f"model.path {path!r}: the folder has no config.json (a local model is "
                          "a folder saved by save_pretrained: config.json, weights, tokenizer files)")
    if str(resolved).startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise RecipeError(f"model.path {path!r}: no such folder (a local model is a folder "
                          "holding config.json and the weights; a hub model is named 'namespace/name')")
    return resolved
