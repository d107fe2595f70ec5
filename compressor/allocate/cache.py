"""On-disk cache of measured sensitivities, keyed by everything that determines them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..models.gguf import cache_root
from ..version import __version__

log = logging.getLogger(__name__)


def cache_folder(configured: str | None) -> Path:
    """The recipe's cache_dir, else $COMPRESSOR_CACHE_DIR, else ~/.cache/compressor; plus 'sensitivity/'."""
    return (Path(configured).expanduser() if configured else cache_root()) / "sensitivity"


def model_fingerprint(location: str, gguf_file: str | None) -> dict:
    """Identity of a model source: each weight/config file's name, size and modification time (or the hub id)."""
    folder = Path(location)
    if not folder.is_dir():
        return {"hub_id": location}
    names = (
        [gguf_file]
        if gguf_file
        else sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf"))
    )
    files = []
    for name in names:
        st = (folder / name).stat()
        files.append([name, st.st_size, st.st_mtime_ns])
    return {"path": str(folder.resolve()), "files": files}


def cache_key(parts: dict) -> str:
    blob = json.dumps({"compressor": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_cached(folder: Path, key: str) -> dict | None:
    path = folder / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable sensitivity cache %s", path)
        return None


def store(folder: Path, key: str, data: dict) -> None:
    """Write atomically (temp file + rename); a cache that cannot be written is only a warning."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(folder / f"{key}.json")
    except OSError as err:
        log.warning("could not write the sensitivity cache in %s (%s); continuing without it", folder, err)
