"""Artifact writers. Each reads an `ArtifactSource` (the plan and the tensors; it never re-derives a decision)
and writes into a given directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _safetensors(source, folder: Path) -> list[str]:
    from .safetensors_export import export_safetensors

    return export_safetensors(source, folder)


def _onnx(source, folder: Path) -> list[str]:
    from .onnx import export_onnx

    return export_onnx(source, folder)


def _gguf(source, folder: Path) -> list[str]:
    from .gguf import export_gguf

    return export_gguf(source, folder)


# recipe `export:` name -> writer(ArtifactSource, folder) returning the files written, relative to folder
EXPORTERS: dict[str, Callable[..., list[str]]] = {"safetensors": _safetensors, "onnx": _onnx, "gguf": _gguf}
