"""Models whose decoder blocks stay in their safetensors shards until a pass needs them (block streaming).

`LazyModel` wraps a transformers model built on the meta device: the embeddings, final norm and head are read at
load time, each block's parameters when a pass asks for that block, and a pass that is done with a block may
*release* parameters it has recorded elsewhere (the quantize pass: every quantized weight lives in the plan), so
peak memory follows the largest block plus the calibration activations, not the depth. A released parameter comes
back from its provider (the plan's dequantized weight) when something needs the whole model again
(`materialize_all`: evaluation, ONNX export, structural passes).

Each parameter is in one of three places: resident (in memory, possibly changed by a pass), in the checkpoint
(untouched since load, read on demand), or with a provider (released). Exporters read the checkpoint ones
straight from disk, so an artifact is written without ever holding the whole float model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

log = logging.getLogger(__name__)

Provider = Callable[[], torch.Tensor]


def unreadable(path: Path, err: BaseException) -> ModelError:
    """The ModelError for a weights file that cannot be read: missing, not readable, truncated or not safetensors
    (`err` is an OSError or safetensors' own SafetensorError, which covers bad headers and short files)."""
    if isinstance(err, FileNotFoundError):
        return ModelError(
            f"the weights file {path} is missing",
            fix="re-download the model, or re-save it with save_pretrained (which writes every shard)",
        )
    if isinstance(err, OSError):
        return ModelError(f"cannot read the weights file {path}: {err.strerror or err}", fix="make it readable")
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ModelError(
        f"the weights file {path} is truncated or corrupt ({detail})",
        fix="re-download the model, or re-save it with save_pretrained",
    )


@contextlib.contextmanager
def safetensors_file(path: Path) -> Iterator:
    """`safe_open(path)`; an unreadable or corrupt file, while opening or reading it, is a ModelError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except (OSError, SafetensorError) as err:
        raise unreadable(path, err) from None


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file, or shards with an index), read a few at a time."""

    def __init__(self, folder: Path, files: dict[str, str], shapes: dict[str, tuple[int, ...]]):
        self.folder, self.files = folder, files  # tensor name -> shard file name
        self.shapes = shapes  # tensor name -> shape, from the shards' headers

    @classmethod
    def open(cls, folder: Path) -> CheckpointReader | None:
        """A reader for `folder`, or None when it holds no safetensors checkpoint. Every shard's header is read
        here: a missing, truncated or corrupt shard, or an index that names tensors a shard lacks, is a ModelError
        now rather than in the middle of a pass."""
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = {str(k): str(v) for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
                raise ModelError(
                    f"{index} is not a valid safetensors index ({type(err).__name__}: {err})",
                    fix="re-download the model, or re-save it with save_pretrained",
                ) from None
        elif (folder / "model.safetensors").is_file():
            files = None
        else:
            return None
        shapes, held = {}, {}
        for file in sorted(set(files.values())) if files else ["model.safetensors"]:
            with safetensors_file(folder / file) as f:
                names = f.keys()  # (the file object is not iterable)
                for key in names:
                    shapes[key], held[key] = tuple(f.get_slice(key).get_shape()), file
        for key, file in (files or {}).items():
            if held.get(key) != file:
                raise ModelError(
                    f"{index} places tensor '{key}' in {file}, which does not hold it",
                    fix="re-download the model, or re-save it with save_pretrained",
                )
        return cls(folder, files or held, shapes)

    def keys(self) -> set[str]:
        return set(self.files)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each shard opened once); a corrupt shard is a ModelError."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for file, keys in by_file.items():
            out.update(self._each(file, keys))
        return out

    def check(self) -> None:
        """Read every tensor once, one at a time: a corrupt shard or a NaN/Inf weight fails here, at load time,
        with one message, instead of in the middle of a pass."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, file in self.files.items():
            by_file[file].append(name)
        for file, keys in sorted(by_file.items()):
            for key, t in self._each(file, keys, one_at_a_time=True):
                check_finite(key, t)

    def _each(self, file: str, keys: list[str], one_at_a_time: bool = False):
        # get_tensor views the file's memory map: a copy lets the map (and its resident pages) go when the file is
        # closed, instead of every tensor ever read pinning its shard in memory
        with safetensors_file(self.folder / file) as f:
            if one_at_a_time:
                for key in keys:
                    yield key, f.get_tensor(key).clone()
                return
            tensors = [(key, f.get_tensor(key).clone()) for key in keys]
        yield from tensors


def check_shapes(reader: CheckpointReader, params: dict[str, nn.Parameter]) -> None:
    """Raise ModelError when a stored tensor's shape differs from the parameter of that name that config.json
    describes (e.g. hidden_size or vocab_size edited after the weights were saved)."""
    for name, p in params.items():
        stored = reader.shapes.get(name)
        if stored is not None and stored != tuple(p.shape):
            raise ModelError(
                f"config.json in {reader.folder} does not match the weights: '{name}' is {list(stored)} in "
                f"{reader.files[name]}, but the config makes it {list(p.shape)}",
                fix="use the config.json saved with these weights (save_pretrained writes both)",
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ModelError when a float tensor holds NaN or Inf."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ModelError(
            f"weight '{name}' contains NaN or Inf",
            fix="the checkpoint is corrupt or diverged; re-export it from a healthy training state",
        )


class LazyModel:
    """A model whose parameters under `lazy_prefixes` are read from `reader` only when materialized."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype):
        self.model, self.reader, self.dtype = model, reader, dtype
        self.providers: dict[str, Provider] = {}
        self.stored_as: dict[str, str] = {}  # parameter name -> checkpoint key where they differ (blocks renumbered)
        self.spilled: dict[str, tuple[Path, str]] = {}  # parameter name -> (spill file, key) of its value (`spill`)
        self._spill_dir: tempfile.TemporaryDirectory | None = None

    def stored_key(self, name: str) -> str:
        """The checkpoint key holding parameter `name`'s original value."""
        return self.stored_as.get(name, name)

    # ---- where a parameter is ---------------------------------------------------------------------------
    def _slots(self, prefix: str = "") -> list[tuple[str, nn.Module, str]]:
        """(full name, owning module, leaf) of every parameter at or under `prefix`."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        base = f"{prefix}." if prefix else ""
        return [
            (f"{base}{mname}.{leaf}" if mname else f"{base}{leaf}", module, leaf)
            for mname, module in root.named_modules()
            for leaf, p in module._parameters.items()
            if p is not None
        ]

    def is_resident(self, prefix: str = "") -> bool:
        return all(not m._parameters[leaf].is_meta for _, m, leaf in self._slots(prefix))

    def _aliases(self, params: set[int]) -> dict[int, list[tuple[str, nn.Module, str]]]:
        """Every slot of the model holding one of these parameter objects (tied weights have several)."""
        out: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for slot in self._slots():
            pid = id(slot[1]._parameters[slot[2]])
            if pid in params:
                out.setdefault(pid, []).append(slot)
        return out

    def _source(self, names: list[str]) -> tuple[str, str]:
        """('provider' | 'spill' | 'checkpoint', name) for a stored parameter known under any of `names`."""
        for name in names:
            if name in self.providers:
                return "provider", name
        for name in names:
            if name in self.spilled:
                return "spill", name
        for name in names:
            if self.stored_key(name) in self.reader.files:
                return "checkpoint", self.stored_key(name)
        raise KeyError(f"no stored value for {names}")

    def tensor(self, name: str) -> torch.Tensor:
        """The current value of parameter `name` without making it resident (checkpoint, provider or memory)."""
        owner, _, leaf = name.rpartition(".")
        current = self.model.get_submodule(owner)._parameters[leaf]
        if not current.is_meta:
            return current.data
        kind, key = self._source([n for n, _, _ in self._aliases({id(current)})[id(current)]])
        if kind == "provider":
            return self.providers[key]().to(self.dtype)
        if kind == "spill":
            return self._read_spilled(key)
        return self.reader.read([key])[key].to(self.dtype)

    # ---- moving parameters --------------------------------------------------------------------------------
    def materialize(self, prefix: str = "") -> None:
        """Make every parameter at or under `prefix` resident (from its provider, else the checkpoint); tied
        parameters stay tied."""
        pending = {id(m._parameters[leaf]) for _, m, leaf in self._slots(prefix) if m._parameters[leaf].is_meta}
        if not pending:
            return
        groups = self._aliases(pending)
        sources = {pid: self._source([n for n, _, _ in slots]) for pid, slots in groups.items()}
        from_disk = self.reader.read(key for kind, key in sources.values() if kind == "checkpoint")
        for pid, slots in groups.items():
            kind, key = sources[pid]
            if kind == "provider":
                value = self.providers.pop(key)()
            elif kind == "spill":
                value = self._read_spilled(key)
            else:
                value = from_disk.pop(key)
            new = nn.Parameter(value.to(self.dtype), requires_grad=False)
            for _, module, leaf in slots:
                module._parameters[leaf] = new

    def evict_unchanged(self, names: Iterable[str]) -> list[str]:
        """Drop resident parameters that still equal the checkpoint (read back from it when needed); returns the
        names evicted. A parameter a pass has changed, or one the checkpoint does not hold, stays."""
        evicted = []
        for name in names:
            owner, _, leaf = name.rpartition(".")
            p = self.model.get_submodule(owner)._parameters.get(leaf)
            if p is None or p.is_meta:
                continue
            slots = self._aliases({id(p)})[id(p)]
            spilled = next((n for n, _, _ in slots if n in self.spilled), None)
            if spilled is not None:
                stored = self._read_spilled(spilled)
            else:
                key = next((self.stored_key(n) for n, _, _ in slots if self.stored_key(n) in self.reader.files), None)
                stored = None if key is None else self.reader.read([key])[key].to(self.dtype)
            if stored is None or not torch.equal(stored, p.data):
                continue
            placeholder = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for _, module, slot_leaf in slots:
                module._parameters[slot_leaf] = placeholder
            evicted.append(name)
        return evicted

    def spill(self, names: Iterable[str]) -> None:
        """Write these resident parameters (made by a pass, so not in the checkpoint) to a spill file of their own
        in a temporary folder and drop them: they are read back when a block is brought in, and dropped again when
        it is let go unchanged, like checkpoint parameters. A full disk is a CompressorError."""
        from safetensors.torch import save_file

        params = {}
        for name in names:
            owner, _, leaf = name.rpartition(".")
            p = self.model.get_submodule(owner)._parameters[leaf]
            if not p.is_meta:
                params[name] = p.data.contiguous()
        if not params:
            return
        if self._spill_dir is None:
            self._spill_dir = tempfile.TemporaryDirectory(prefix="compressor-spill-")
        path = Path(self._spill_dir.name) / f"{len({f for f, _ in self.spilled.values()})}.safetensors"
        try:
            save_file(params, str(path))
        except (OSError, RuntimeError) as err:
            from ..errors import CompressorError

            size = sum(t.numel() * t.element_size() for t in params.values())
            raise CompressorError(
                f"cannot store {size / 2**20:.0f} MiB of changed weights in {self._spill_dir.name}: {err}",
                fix="free disk space there or point TMPDIR at a disk with room",
            ) from None
        for name in params:
            self.spilled[name] = (path, name)
        self.evict_unchanged(params)

    def _read_spilled(self, name: str) -> torch.Tensor:
        path, key = self.spilled[name]
        with safetensors_file(path) as f:
            return f.get_tensor(key).clone().to(self.dtype)

    def follow_moves(self, moves: dict[str, str]) -> None:
        """After block surgery moved modules: what was under each old prefix (`'model.layers.5.'`) is now under its
        new one (`'model.layers.4.'`), all at once; parameters under no new prefix keep their names, those of deleted
        modules are forgotten. Checkpoint keys and providers follow the parameters."""
        back = {new: old for old, new in moves.items()}
        stored, providers, spilled = {}, {}, {}
        for name, _, _ in self._slots():
            new_prefix = next((p for p in back if name.startswith(p)), None)
            old = back[new_prefix] + name[len(new_prefix) :] if new_prefix is not None else name
            if self.stored_key(old) != name:
                stored[name] = self.stored_key(old)
            if old in self.providers:
                providers[name] = self.providers[old]
            if old in self.spilled:
                spilled[name] = self.spilled[old]
        self.stored_as, self.providers, self.spilled = stored, providers, spilled

    def materialize_all(self) -> nn.Module:
        """Make the whole model resident (re-tying tied embeddings); returns it."""
        if not self.is_resident():
            self.materialize()
            if getattr(self.model.config, "tie_word_embeddings", False):
                self.model.tie_weights()
        return self.model

    def fresh_copy(self) -> nn.Module:
        """A separate, fully loaded copy of the model as the checkpoint holds it (e.g. the base for KL)."""
        from safetensors import SafetensorError

        try:
            model = type(self.model).from_pretrained(self.reader.folder, dtype=self.dtype)
        except (OSError, SafetensorError) as err:  # the checkpoint changed on disk since it was loaded
            raise unreadable(self.reader.folder, err) from None
        return model.eval().requires_grad_(False)

    def release(self, names: Iterable[str], provider_for: Callable[[str], Provider]) -> None:
        """Drop resident parameters whose value `provider_for(name)()` can give back (e.g. from the plan)."""
        for name in names:
            owner, _, leaf = name.rpartition(".")
            p = self.model.get_submodule(owner)._parameters[leaf]
            if p.is_meta:
                continue
            self.providers[name] = provider_for(name)
            placeholder = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for _, module, slot_leaf in self._aliases({id(p)})[id(p)]:
                module._parameters[slot_leaf] = placeholder


def build_lazy(
    cls, config, folder: Path, lazy_prefixes: Callable[[nn.Module], list[str]], dtype: torch.dtype
) -> LazyModel | None:
    """A LazyModel of `cls` over the checkpoint in `folder`, or None when its tensors do not map one-to-one onto
    the model's parameters (old key names, tensors transformers converts on load): the caller then loads eagerly.
    """
    from accelerate import init_empty_weights

    reader = CheckpointReader.open(folder)
    if reader is None:
        return None
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    params = dict(model.named_parameters())  # tied parameters appear once
    check_shapes(reader, params)
    buffers = {n for n, _ in model.named_buffers()}
    stored = reader.keys()
    missing = set(params) - stored
    if getattr(config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        missing -= {n for n, p in params.items() if head is not None and p is head.weight}
    unexpected = stored - set(params) - buffers
    if missing or unexpected:
        log.debug("checkpoint keys differ from the model's (missing %s, unexpected %s)", missing, unexpected)
        return None
    reader.check()
    lazy = LazyModel(model, reader, dtype)
    prefixes = tuple(p + "." for p in lazy_prefixes(model))
    eager = [n for n in params if not n.startswith(prefixes)]
    for name, value in reader.read(eager).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module._parameters[leaf] = nn.Parameter(value.to(dtype), requires_grad=False)
    persistent = stored & buffers
    for name, value in reader.read(persistent).items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return lazy
