"""The block-by-block gradient sweep (Fisher statistics of allocate_bits): equal to a whole-model backward, the
same for any split of windows among processes, and one block resident at a time for a streamed model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.allocate.fisher import _sampled_log_likelihood
from compressor.calibration.engine import GramStat, Residency
from compressor.calibration.gradients import GradientSweep
from compressor.models.adapters import adapter_for
from compressor.models.loading import load_model


def _model(tiny_model_dir, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()
    return model.requires_grad_(False), adapter_for(model.config.model_type)


def _ids(n=4, seq=24):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(3))


def _sweep(model, adapter, ids, indices, residency=None):
    """{(block, kind, name): GramStat} of one sweep over `ids` (no reduction)."""
    sweep = GradientSweep(
        model,
        adapter.blocks(model),
        list(ids),
        indices,
        list(adapter.linear_groups),
        _sampled_log_likelihood(0),
        residency=residency,
    )
    sweep.forward()
    out = {}
    try:
        for grams in sweep.backward():
            out.update({(grams.index, "h", k): v for k, v in grams.inputs.items()})
            out.update({(grams.index, "g", k): v for k, v in grams.outputs.items()})
    finally:
        sweep.close()
    return out


def _whole_model_reference(model, adapter, ids):
    """The same statistics from one whole-model forward + backward per window (the pre-#28 sweep)."""
    objective, stats, handles = _sampled_log_likelihood(0), {}, []
    for bi, block in enumerate(adapter.blocks(model)):
        for group in adapter.linear_groups:
            for name in group:

                def hook(module, inputs, output, key=(bi, name), first=name == group[0]):
                    if first:
                        stats.setdefault((key[0], "h", key[1]), GramStat(inputs[0].shape[-1], track_abs=False))
                        stats[(key[0], "h", key[1])].add(inputs[0].detach())
                    g = stats.setdefault((key[0], "g", key[1]), GramStat(output.shape[-1], track_abs=False))
                    output.register_hook(lambda grad, g=g: g.add(grad.detach()))

                handles.append(block.get_submodule(name).register_forward_hook(hook))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True)))
    try:
        for index, row in enumerate(ids):
            x = row[None]
            with torch.enable_grad():
                logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
                objective(logits, index).backward()
    finally:
        for h in handles:
            h.remove()
    return stats


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_block_by_block_equals_a_whole_model_backward(tiny_model_dir, family):
    """Stored boundaries, a head-only replay and per-block re-runs give the whole-model backward's H and G
    (GPT-2: Conv1D linears and tuple-returning blocks; gemma3: per-block attention kinds)."""
    model, adapter = _model(tiny_model_dir, family)
    ids = _ids()
    ours, ref = _sweep(model, adapter, ids, range(len(ids))), _whole_model_reference(model, adapter, ids)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key].count == ref[key].count
        torch.testing.assert_close(ours[key].mean(), ref[key].mean(), rtol=1e-4, atol=1e-9, msg=str(key))


def test_statistics_do_not_depend_on_how_windows_are_split(tiny_model_dir):
    """Two 'processes' with two windows each, their sums merged in either order, equal one sweep bit for bit: each
    window draws its tokens from its own index, and sums are float64 over per-window float32 products."""
    model, adapter = _model(tiny_model_dir, "llama")
    ids = _ids()
    whole = _sweep(model, adapter, ids, range(4))
    first, second = _sweep(model, adapter, ids[:2], range(2)), _sweep(model, adapter, ids[2:], range(2, 4))
    for key, stat in whole.items():
        for a, b in ((first, second), (second, first)):
            merged = GramStat(stat.h.shape[0], track_abs=False)
            merged.merge(a[key])
            merged.merge(b[key])
            assert torch.equal(merged.mean(), stat.mean()), key


def test_a_streamed_model_has_one_block_resident_at_a_time(tiny_model_dir):
    """With the streamed model's residency, the sweep brings each block in for its forward and its backward and
    lets it go after; the statistics equal those of the model loaded whole."""
    loaded = load_model(str(tiny_model_dir("llama")), stream=True)
    assert loaded.lazy is not None
    from compressor.recipe import Recipe
    from compressor.state import CompressionState

    state = CompressionState(loaded, Recipe.model_validate({"model": "x", "passes": []}))
    residency, blocks = state.residency(), loaded.adapter.blocks(loaded.model)
    most = [0]

    def load_block(i):
        residency.load_block(i)
        resident = [b for b in blocks if not any(p.is_meta for p in b.parameters())]
        most[0] = max(most[0], len(resident))

    watched = Residency(load_block, residency.release_block, residency.load_outside, residency.release_outside)
    ids = _ids()
    ours = _sweep(loaded.model, loaded.adapter, ids, range(4), watched)
    assert most[0] == 1
    assert all(any(p.is_meta for p in b.parameters()) for b in blocks)  # every block back on disk
    assert not any(p.is_meta for p in loaded.model.get_input_embeddings().parameters())  # embeddings back
    model, adapter = _model(tiny_model_dir, "llama")
    whole = _sweep(model, adapter, ids, range(4))
    for key, stat in whole.items():
        torch.testing.assert_close(ours[key].mean(), stat.mean(), rtol=0, atol=0, msg=str(key))


def test_a_full_disk_while_storing_boundaries_is_one_clear_error(tiny_model_dir, monkeypatch):
    import errno

    from compressor.errors import CompressorError

    model, adapter = _model(tiny_model_dir, "llama")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CompressorError, match="cannot store block activations.*No space left") as err:
        _sweep(model, adapter, _ids(), range(4))
    assert "TMPDIR" in err.value.fix
