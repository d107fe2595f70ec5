"""GGUF sources: converted once, tensor by tensor, into a float safetensors checkpoint kept in a cache folder.

Every later step then reads an ordinary Hugging Face directory: blocks can be streamed from its shards, the
float weights of untouched tensors are exported from it, and a second run skips the conversion (transformers'
own GGUF path re-parses the file, rebuilds the tokenizer and dequantizes every tensor into memory on every load).

The GGUF -> transformers name mapping and the per-architecture tensor fixes (llama's q/k permutation, gemma's
norm offsets, ...) are transformers' own (`modeling_gguf_pytorch_utils`); only the loop is ours, so that one tensor
at a time is dequantized and at most one shard (`SHARD_BYTES`) is held in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..errors import ModelError, io_errno

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the cached layout changes
SHARD_BYTES = 256 * 2**20
_NATIVE_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def cache_root() -> Path:
    """$COMPRESSOR_CACHE_DIR, else ~/.cache/compressor."""
    return Path(os.environ.get("COMPRESSOR_CACHE_DIR") or Path.home() / ".cache" / "compressor").expanduser()


def _cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    ident = json.dumps([str(gguf_path.resolve()), st.st_size, st.st_mtime_ns, CONVERTER_VERSION])
    return cache_root() / "gguf" / f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def float_checkpoint(gguf_path: Path, quiet: bool = False) -> Path:
    """The folder of the float checkpoint converted from `gguf_path` (converting it on first use)."""
    target = _cache_dir(gguf_path)
    if (target / "complete.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf_path, tmp, quiet)
        if (target / "complete.json").is_file():  # another process (a worker of the same run) finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy a killed run left
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "complete.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race to a complete copy: use it
    except (OSError, SafetensorError) as err:  # the GGUF file was read whole before: this is the cache's write
        shutil.rmtree(tmp, ignore_errors=True)
        code = io_errno(err)
        if code is None:
            raise
        raise ModelError(
            f"cannot write the float copy of {gguf_path.name} under {target.parent} ({os.strerror(code)})",
            fix="free disk space or point COMPRESSOR_CACHE_DIR at a writable folder with room for it",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(gguf_path: Path, out: Path, quiet: bool) -> None:
    from gguf import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = open_gguf(gguf_path)
    out.mkdir(parents=True)
    config, parsed = _write_config_and_tokenizer(gguf_path, out)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    key_map = get_gguf_hf_weights_map(skeleton, processor)

    shards = _ShardWriter(out)
    for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor", disable=quiet):
        try:
            weights = dequantize(t.data, t.tensor_type)
        except NotImplementedError:  # gguf's answer for a quantization type it has no decoder for
            raise ModelError(
                f"tensor '{t.name}' of {gguf_path} is stored as {t.tensor_type.name}, which the gguf package "
                "cannot dequantize",
                fix="use a GGUF of another quantization type (e.g. Q8_0, Q4_K_M) or the model's Hugging Face directory",
            ) from None
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=key_map, parsed_parameters=parsed)
        if result.name not in key_map:
            continue
        dtype = _NATIVE_FLOAT.get(t.tensor_type.name, torch.float32)
        shards.add(key_map[result.name], torch.from_numpy(np.array(result.weights)).to(dtype))
    shards.close(gguf_path)


# what gguf's reader raises on a file that is truncated, or not GGUF at all (it parses with struct and numpy)
PARSE_ERRORS = (ValueError, KeyError, IndexError, struct.error, OverflowError)


def open_gguf(gguf_path: Path):
    """A GGUFReader over the whole file (every field and tensor located); a file that cannot be read, is not GGUF
    or is cut short is a ModelError naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(gguf_path))
    except OSError as err:
        raise ModelError(
            f"cannot read the GGUF file {gguf_path}: {err.strerror or err}", fix="make it readable"
        ) from None
    except PARSE_ERRORS as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelError(
            f"the GGUF file {gguf_path} is truncated or corrupt ({detail})",
            fix="re-download it, or convert the model to GGUF again",
        ) from None


def _write_config_and_tokenizer(gguf_path: Path, out: Path) -> tuple:
    """Save the float config and the tokenizer read from the GGUF file; returns (config, parsed GGUF checkpoint)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    except (OSError, ValueError, KeyError) as err:  # the file parsed (open_gguf): its content is not convertible
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelError(
            f"transformers cannot convert the GGUF file {gguf_path} ({type(err).__name__}: {detail})",
            fix="pass the model's Hugging Face directory or hub id instead",
        ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF grid is dequantized: the copy is a plain float checkpoint
    config.dtype = "float32"
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return config, parsed


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `SHARD_BYTES` (one held in memory), then the index."""

    def __init__(self, out: Path):
        self.out = out
        self.shard: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > SHARD_BYTES:
            self._flush()
            self.size = 0
        self.shard[key] = tensor
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"model-{len(self.written) + 1:05d}.safetensors"
        save_file(self.shard, str(self.out / file), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.shard, file))
        self.written.append(file)
        self.shard = {}

    def close(self, gguf_path: Path) -> None:
        """Write the last shard, the index and `complete.json` (which marks the conversion done)."""
        if self.shard:
            self._flush()
        out = self.out
        total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        source = {"source": str(gguf_path.resolve()), "shards": self.written}
        (out / "complete.json").write_text(json.dumps(source) + "\n")
