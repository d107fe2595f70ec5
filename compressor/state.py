"""CompressionState: everything passes read and write during one run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration.engine import Residency
from .calibration.ranks import Ranks
from .models.lazy import LazyModel
from .models.loading import LoadedModel
from .plan import Plan
from .recipe import Recipe
from .runtime.factored import expand_groups


def artifact_dtype(choice: str, loaded: LoadedModel) -> torch.dtype:
    """The dtype of the artifact's unquantized tensors for the recipe's `dtype`: `auto` is the source checkpoint's
    declared dtype, bfloat16 for a GGUF source (which declares none: its float copy is float32 only because it
    was dequantized)."""
    if choice != "auto":
        return getattr(torch, choice)
    return torch.bfloat16 if loaded.source.gguf_file else loaded.export_dtype


@dataclass
class CompressionState:
    loaded: LoadedModel
    recipe: Recipe
    calibration_ids: torch.Tensor | None = None
    plan: Plan = field(default_factory=Plan)
    report: dict = field(default_factory=dict)  # pass-owned sections merged into report.json (e.g. "scores")
    extra_files: dict[str, bytes] = field(default_factory=dict)  # artifact-relative path -> bytes (plots)
    quiet: bool = False
    ranks: Ranks = field(default_factory=Ranks)  # this process among the run's processes (torch.distributed)

    def __post_init__(self) -> None:
        self.plan.dtype = artifact_dtype(self.recipe.dtype, self.loaded)

    @property
    def model(self):
        """The model as it stands; streamed blocks may still be on disk (meta tensors). See `full_model`."""
        return self.loaded.model

    def full_model(self):
        """The model with every parameter in memory (for passes that run the whole model)."""
        return self.loaded.full_model()

    @property
    def adapter(self):
        return self.loaded.adapter

    def linear_groups(self, block: int) -> list[tuple[str, ...]]:
        """Block `block`'s linears grouped by shared input, in execution order (names inside the block): the
        adapter's groups, a decomposed linear (`lowrank` decompose) as its two factors."""
        prefix = self.adapter.block_prefixes(self.model)[block] + "."
        factored = {n[len(prefix) :] for n in self.plan.factored if n.startswith(prefix)}
        return expand_groups(self.adapter.linear_groups, factored)

    def linear_names(self, block: int) -> list[str]:
        """Block `block`'s linears in execution order (`linear_groups` flattened)."""
        return [n for group in self.linear_groups(block) for n in group]

    def load_block(self, prefix: str) -> None:
        """Streamed models: read the block's parameters from the checkpoint (no-op when resident)."""
        if self.loaded.lazy is not None:
            self.loaded.lazy.materialize(prefix)

    def follow_block_removal(self, before: list[str], kept: list[int]) -> None:
        """After blocks were deleted (`before`: the block prefixes until then; `kept`: the indices that remain, in
        order): a streamed model's parameters read their checkpoint keys under the blocks' old indices."""
        if self.loaded.lazy is None:
            return
        after = self.adapter.block_prefixes(self.model)
        self.loaded.lazy.follow_moves({before[old] + ".": after[new] + "." for new, old in enumerate(kept)})

    def spill(self, params: list[str]) -> None:
        """Streamed models: parameters a pass made (e.g. decomposition factors) go to a temporary file and are
        read back when their block is brought in, so they do not all stay in memory (no-op for a model loaded
        whole)."""
        if self.loaded.lazy is not None:
            self.loaded.lazy.spill(params)

    def evict_outside_blocks(self) -> None:
        """Streamed models: drop the parameters outside the decoder blocks (embeddings, head, final norm) while a
        block-by-block sweep runs; untouched ones are read back from the checkpoint when needed."""
        self.residency().release_outside()

    def residency(self) -> Residency:
        """How a block-by-block sweep brings blocks into memory and lets them go: for a streamed model, from and back
        to the checkpoint (a parameter some pass changed stays resident); for a model loaded whole, nothing."""
        return lazy_residency(self.loaded.lazy, self.adapter)

    def release_quantized(self, layers: list[str]) -> None:
        """Streamed models: drop the float weights of these planned layers; they are rebuilt from the plan
        (dequantized) if the whole model is needed again. Keeps peak memory at about one block."""
        lazy = self.loaded.lazy
        if lazy is None:
            return
        model, adapter, plan = self.model, self.adapter, self.plan

        def provider_for(param: str):
            layer = param.rpartition(".")[0]
            module = model.get_submodule(layer)
            return lambda: adapter.param_layout(module, plan.effective_weight(layer))

        lazy.release([f"{name}.weight" for name in layers if name in plan.weights], provider_for)

    def artifact_model(self):
        """The full model as the artifact stores it: every unquantized floating tensor that the artifact writes
        (parameters and persistent buffers) rounded to the artifact's dtype, in place (idempotent). Evaluation and
        the load-back check run this model, so the report measures what ships."""
        model = self.full_model()
        self._round_as_artifact(model)
        return model

    def artifact_residency(self) -> Residency:
        """`residency()` for running the compressed model block by block as the artifact stores it: each block (and
        the embeddings and head) is rounded like `artifact_model` once it is resident. Quantized weights come back
        dequantized from the plan; a rounded tensor differs from the checkpoint, so it stays resident (norms,
        biases, linears kept in float); a quantized weight goes back to the plan when its block is let go."""
        base = self.residency()
        model, prefixes = self.model, self.adapter.block_prefixes(self.model)

        def load_block(i: int) -> None:
            base.load_block(i)
            self._round_as_artifact(model.get_submodule(prefixes[i]), prefixes[i] + ".")

        def release_block(i: int) -> None:
            self.release_quantized([n for n in self.plan.weights if n.startswith(prefixes[i] + ".")])
            base.release_block(i)

        def load_outside() -> None:
            base.load_outside()
            blocks = tuple(p + "." for p in prefixes)
            self._round_as_artifact(model, skip=blocks)

        return Residency(load_block, release_block, load_outside, base.release_outside)

    def _round_as_artifact(self, module, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
        """Unquantized floating tensors of `module` (named `prefix` + key in the model) rounded to the artifact's
        dtype in place; tensors under `skip` and those not resident are left alone."""
        dtype, quantized = self.plan.dtype, {f"{name}.weight" for name in self.plan.layers}
        if dtype == torch.float32:
            return
        with torch.no_grad():
            for key, tensor in module.state_dict(keep_vars=True).items():
                name = prefix + key
                if name in quantized or name.startswith(skip) or tensor.is_meta:
                    continue
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.copy_(tensor.to(dtype))

    def finish_plan(self) -> None:
        """Record the artifact's layout in the plan (which linears stay float, the embeddings) after the passes."""
        from transformers.pytorch_utils import Conv1D  # gpt2's linears

        model, adapter = self.model, self.adapter
        head = model.get_output_embeddings()
        block_linears = [f"{p}.{n}" for i, p in enumerate(adapter.block_prefixes(model)) for n in self.linear_names(i)]
        embeddings, floats, head_linear = [], [], None
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) or (head is not None and module is head):
                embeddings.append(name)
                head_linear = name if module is head and isinstance(module, torch.nn.Linear) else head_linear
            elif isinstance(module, (torch.nn.Linear, Conv1D)):
                floats.append(name)
        self.plan.finish(block_linears, head_linear, embeddings, floats)

    def calibration_chunks(self) -> list[torch.Tensor]:
        ids = self.calibration_ids
        bs = self.recipe.calibration.batch_size
        return [ids[i : i + bs] for i in range(0, ids.shape[0], bs)]


def lazy_residency(lazy: LazyModel | None, adapter) -> Residency:
    """`Residency` over a streamed model: blocks read from the checkpoint and let go again (a parameter changed since
    it was read stays), the embeddings and head likewise; nothing to do for a model loaded whole (None)."""
    if lazy is None:
        return Residency()
    model = lazy.model
    prefixes = adapter.block_prefixes(model)
    blocks = tuple(p + "." for p in prefixes)

    def load_block(i: int) -> None:
        lazy.materialize(prefixes[i])

    def release_block(i: int) -> None:
        lazy.evict_unchanged(n for n, _ in model.named_parameters() if n.startswith(prefixes[i] + "."))

    def load_outside() -> None:
        for name, _ in model.named_parameters():
            if not name.startswith(blocks):
                lazy.materialize(name.rpartition(".")[0])

    def release_outside() -> None:
        lazy.evict_unchanged(n for n, _ in model.named_parameters() if not n.startswith(blocks))

    return Residency(load_block, release_block, load_outside, release_outside)
