"""Artifact writers. Each reads the plan (never re-derives a decision) and writes into a given directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _safetensors(state, folder: Path) -> list[str]:
    from .safetensors_export import export_safetensors

    return export_safetensors(state, folder)


def _onnx(state, folder: Path) -> list[str]:
    from .onnx import export_onnx

    return export_onnx(state, folder)


# recipe `export:` name -> writer(state, folder) returning the files written, relative to folder
EXPORTERS: dict[str, Callable[..., list[str]]] = {"safetensors": _safetensors, "onnx": _onnx}
