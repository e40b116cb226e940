"""GGUF files as model paths: dequantised once through transformers, cached as a safetensors folder.

A `.gguf` file (llama.cpp's format; what PyPI model packages ship) is read by transformers'
GGUF support (`from_pretrained(dir, gguf_file=...)`, needs the `gguf` package), dequantised to
float32 and saved with its tokenizer, chat template and generation config into

    <root>/gguf/<file stem>-<first 16 hex digits of the file's SHA-256>/

root = ``$URLVR_CACHE``, else ``~/.cache/urlvr`` (the tiny model's root too). Every later run,
export and the vLLM engine read that plain HF folder; dequantising again is never needed. The
folder is written under a temporary sibling and renamed into place after its marker file, so a
run killed mid-write leaves no folder that looks complete (the next run starts over).

Measured (2 loaded cores, transformers 5.25): SmolLM2-135M-Instruct Q4_1 (98 MB) loads in
35-60 s; Gemma 3 270M Q4_K_M in about 62 s. Architectures transformers cannot read from GGUF
are refused with the list it can (``GGUF_SUPPORTED_ARCHITECTURES``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from urlvr.errors import RecipeError

GGUF_SUFFIX = ".gguf"
MARKER_FILE = "urlvr_gguf.json"  # written last: its presence means the folder is complete
CACHE_SUBDIR = "gguf"


def cache_root() -> Path:
    """``$URLVR_CACHE`` if set, else ``~/.cache/urlvr`` (shared with the tiny model's build)."""
    return Path(os.environ.get("URLVR_CACHE") or Path.home() / ".cache" / "urlvr")


def progress(message: str) -> None:
    """One line on stderr, flushed: shown in a terminal and in a log file alike."""
    print(f"urlvr: {message}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (about 0.5 s per 100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the only ``*.gguf`` in a folder that
    is not already an HF model folder (no config.json). None when `path` names no GGUF.

    Raises RecipeError for a folder holding several GGUF files (name one)."""
    local = Path(path).expanduser()
    if local.is_file():
        return local if local.suffix.lower() == GGUF_SUFFIX else None
    if not local.is_dir() or (local / "config.json").is_file():
        return None
    found = sorted(p for p in local.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise RecipeError(f"model.path {str(path)!r}: the folder holds {len(found)} GGUF files "
                          f"({', '.join(p.name for p in found)}); name one of them")
    return found[0] if found else None


def cached_folder(gguf: Path, sha256: str, cache_dir: Path | None = None) -> Path:
    """Where the dequantised copy of `gguf` (content hash `sha256`) lives or will live."""
    return Path(cache_dir or cache_root()) / CACHE_SUBDIR / f"{gguf.stem}-{sha256[:16]}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()


def dequantise_gguf(gguf: Path, *, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """The cached HF folder for `gguf`, dequantising it first if no complete copy exists.

    `sha256`: the file's known hash (skips hashing; a package that checks its own file knows it).
    Raises RecipeError when the `gguf` package is missing or transformers cannot read the
    file's architecture."""
    gguf = Path(gguf).expanduser().resolve()
    sha256 = sha256 or file_sha256(gguf)
    target = cached_folder(gguf, sha256, cache_dir)
    if is_complete(target):
        return target
    check_readable(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        progress(f"dequantising {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to float32 safetensors, "
                 f"once, into {target} (about a minute on CPU)")
        started = time.perf_counter()
        model, tokenizer = load_gguf(gguf)
        loaded = time.perf_counter() - started
        progress(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                 f"parameters) in {loaded:.0f} s; writing the cache")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {"source": str(gguf), "sha256": sha256, "architecture": type(model).__name__,
                "load_seconds": round(loaded, 1), "total_seconds": round(time.perf_counter() - started, 1)}
        (staging / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        del model
        try:
            staging.rename(target)
        except OSError:  # another process finished first, or a stale partial folder is in the way
            if not is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        progress(f"cached {gguf.name} in {time.perf_counter() - started:.0f} s: {target}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_readable(path: Path) -> None:
    """Read the file's header and tensor index with the `gguf` package before any long work, so
    an empty, truncated or foreign file is one line naming it (not a struct error from deep
    inside transformers after "dequantising" was announced). About 5 s for SmolLM2's 98 MB.

    Raises RecipeError: the `gguf` package is missing, or the file is not a complete GGUF."""
    gguf_reader = _gguf_package(path).GGUFReader
    try:
        gguf_reader(str(path))
    except Exception as err:  # noqa: BLE001  the reader raises ValueError, struct.error, IndexError...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"model.path {str(path)!r} ({path.stat().st_size:,} bytes) is not a complete GGUF file "
                          f"({reason}): it is damaged, truncated or another format; reinstall the package that "
                          "ships it or download it again") from None


def _gguf_package(path: Path):
    """The `gguf` package (transformers' GGUF reader), or a RecipeError saying how to install it."""
    try:
        import gguf  # optional dependency: only GGUF model paths need it
    except ImportError:
        raise RecipeError(f"model.path {str(path)!r}: reading GGUF files needs the gguf package: "
                          "pip install gguf") from None
    return gguf


def load_gguf(path: Path):
    """``(model, tokenizer)`` read from a GGUF file by transformers, float32, with the GGUF
    quantization config dropped (dequantised weights; `save_pretrained` refuses it otherwise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy (seconds), loaded on demand: a GGUF is read

    _gguf_package(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as err:  # not a GGUF, truncated, or an architecture it cannot map
        if "not supported" not in str(err):
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RecipeError(f"model.path {str(path)!r}: transformers cannot read this GGUF file: {reason}") from None
        import transformers  # (loaded above) for its version in the message
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # on this error path only

        readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # sections, not models
        raise RecipeError(f"model.path {str(path)!r}: transformers {transformers.__version__} cannot read this "
                          f"GGUF ({err}); it reads {', '.join(readable)}; convert the model to an HF folder "
                          "instead") from None
    # the weights are plain float32 now; the config must not claim a quantisation
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer
