"""The source model's sentence-transformers files, carried into the artifact unchanged.

A sentence-embedding model ships, beside the transformer, how sentence-transformers runs it: `modules.json` (the
chain of modules), `config_sentence_transformers.json`, `sentence_bert_config.json`, and a folder for each module
after the transformer (`1_Pooling/config.json`, `2_Dense/...`, `2_Normalize`). The artifact's weights are the
compressed transformer; the modules around it are the source's, copied as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

TOP_LEVEL = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"  # the weights themselves: ours, not copied


def source_folder(model) -> Path | None:
    """The local directory the model was loaded from, or None (a hub id, or a model built in memory)."""
    name = str(getattr(model, "name_or_path", "") or "")
    return Path(name) if name and Path(name).is_dir() else None


def _module_folders(source: Path) -> list[str]:
    """The folders of the modules `modules.json` lists after the transformer, relative to `source`."""
    try:
        modules = json.loads((source / "modules.json").read_text())
    except ValueError:  # not JSON
        modules = None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        log.warning("modules.json of %s is not a sentence-transformers module list; its folders are not copied", source)
        return []
    paths = [m.get("path") for m in modules if not str(m.get("type", "")).endswith(TRANSFORMER_MODULE)]
    folders = []
    for path in paths:
        if not isinstance(path, str) or not path:
            continue
        resolved = (source / path).resolve()
        if resolved == source.resolve() or not resolved.is_relative_to(source.resolve()):
            log.warning("modules.json of %s names a module outside the model directory (%s); not copied", source, path)
            continue
        folders.append(path)
    return folders


def copy_sentence_transformers_files(source: Path | None, folder: Path) -> list[str]:
    """Copy the sentence-transformers files of the model directory `source` into `folder`; returns the files
    written, relative to `folder` (none when `source` has none)."""
    if source is None:
        return []
    names = [n for n in TOP_LEVEL if (source / n).is_file()]
    names += sorted({p.name for p in source.glob("sentence_*_config.json")} - set(names))
    if not names:
        return []
    for name in names:
        shutil.copyfile(source / name, folder / name)
    files = list(names)
    for module in _module_folders(source) if "modules.json" in names else []:
        if not (source / module).is_dir():
            continue  # a module that keeps no files (Normalize) has no folder in a hub repository
        shutil.copytree(source / module, folder / module, dirs_exist_ok=True)
        files += sorted(p.relative_to(folder).as_posix() for p in (folder / module).rglob("*") if p.is_file())
    return files
