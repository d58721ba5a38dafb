"""Finding chips and models by name: the built-in catalogs, plus user additions in YAML.

A user file (`--catalog FILE`, or `$QANAT_PLANNER_HOME/catalog.yaml`, default ~/.config/qanat/) may add or
override entries:

    chips:
      - name: my-gpu
        class: gpu-gddr            # one of chips.CHIP_CLASSES: picks the default efficiency factors
        peak_tflops: {bf16: 180, fp8: 360}
        memory_gb: 48
        memory_bandwidth_gbs: 960
        tdp_w: 300
        idle_w: 30                 # optional
        interconnect_gbs: 64       # optional
        price_per_hour: 1.10       # optional, US$ per chip-hour
        sources: ["vendor datasheet URL"]
    models:
      - name: my-model
        config: path/to/config.json   # an HF config, relative to the YAML file ...
      - name: my-other-model          # ... or the shape itself (ModelSpec's field names)
        n_layers: 32
        d_model: 4096
        n_heads: 32
        n_kv_heads: 8
        d_ff: 14336
        vocab: 128256
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from qanat.planner.catalog_models import BUILTIN_MODELS
from qanat.planner.chips import BUILTIN_CHIPS, ChipSpec, this_machine
from qanat.planner.gguf import model_from_gguf
from qanat.planner.hfconfig import model_from_config, read_config
from qanat.planner.model import ModelSpec


def planner_home() -> Path:
    return Path(os.environ.get("QANAT_PLANNER_HOME", Path.home() / ".config" / "qanat"))


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-")


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read catalog {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"chips", "models"}:
        raise ValueError(f"{path}: a catalog has top-level keys 'chips' and/or 'models' only")
    return data


def _chip_from_yaml(entry: dict[str, Any], path: Path) -> ChipSpec:
    try:
        return ChipSpec(
            name=str(entry["name"]), chip_class=str(entry["class"]),
            peak_flops={k: float(v) * 1e12 for k, v in dict(entry["peak_tflops"]).items()},
            memory_bytes=float(entry["memory_gb"]) * 1e9, memory_bw=float(entry["memory_bandwidth_gbs"]) * 1e9,
            tdp_w=float(entry["tdp_w"]), interconnect_bw=float(entry.get("interconnect_gbs", 0)) * 1e9,
            idle_w=float(entry["idle_w"]) if entry.get("idle_w") is not None else None,
            price_per_hour=float(entry["price_per_hour"]) if entry.get("price_per_hour") is not None else None,
            price_note=str(entry.get("price_note", "")), sram_is_memory=bool(entry.get("sram_is_memory", False)),
            vendor=str(entry.get("vendor", "")),
            sources=tuple(str(s) for s in entry.get("sources", [f"user catalog {path}"])),
            notes=str(entry.get("notes", "")), aliases=tuple(str(a) for a in entry.get("aliases", [])),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: chip {entry.get('name', '?')!r}: {e}") from e


def _model_from_yaml(entry: dict[str, Any], path: Path) -> ModelSpec:
    name = str(entry.get("name", "?"))
    if "config" in entry:
        config_path = (path.parent / str(entry["config"])).resolve()
        spec = read_config(config_path)
        return ModelSpec(**{**{f.name: getattr(spec, f.name) for f in fields(ModelSpec)}, "name": name,
                            "source": f"user catalog {path} -> {config_path}"})
    known = {f.name for f in fields(ModelSpec)} - {"gguf", "source"}
    unknown = set(entry) - known - {"sources"}
    if unknown:
        raise ValueError(f"{path}: model {name!r}: unknown fields {', '.join(sorted(unknown))}")
    try:
        return ModelSpec(**{k: v for k, v in entry.items() if k in known}, source=f"user catalog {path}")
    except TypeError as e:
        raise ValueError(f"{path}: model {name!r}: {e}") from e


class Catalog:
    def __init__(self, user_files: list[Path] | None = None) -> None:
        self.chips: dict[str, ChipSpec] = {_norm(c.name): c for c in BUILTIN_CHIPS}
        self.models: dict[str, ModelSpec] = {_norm(m.name): m for m in BUILTIN_MODELS}
        files = list(user_files or [])
        default = planner_home() / "catalog.yaml"
        if not user_files and default.is_file():
            files.append(default)
        for path in files:
            data = _load_yaml(path)
            for entry in data.get("chips") or []:
                chip = _chip_from_yaml(entry, path)
                self.chips[_norm(chip.name)] = chip
            for entry in data.get("models") or []:
                model = _model_from_yaml(entry, path)
                self.models[_norm(model.name)] = model

    def chip(self, name: str, threads: int | None = None) -> ChipSpec:
        key = _norm(name)
        if key in ("this-machine", "this", "host", "local"):
            return this_machine(threads)
        if key in self.chips:
            return self.chips[key]
        for chip in self.chips.values():
            if key in (_norm(a) for a in chip.aliases):
                return chip
        raise ValueError(f"unknown chip {name!r}; `qanat plan --list-chips` lists them")

    def model(self, ref: str) -> ModelSpec:
        """A catalog name, a .gguf file, an HF config.json, or a directory holding one."""
        path = Path(ref).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            path = path / "config.json"
        if path.is_file():
            if path.suffix == ".gguf":
                return model_from_gguf(path)
            return read_config(path)
        key = _norm(ref)
        if key in self.models:
            return self.models[key]
        matches = [m for k, m in self.models.items() if key in k]
        if len(matches) == 1:
            return matches[0]
        raise ValueError(f"unknown model {ref!r}: not a file, and not in the catalog (`qanat plan --list-models`)")


__all__ = ["Catalog", "model_from_config", "planner_home"]
