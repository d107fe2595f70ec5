"""The block-sequential engine: capture, lockstep forward, statistics."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.calibration.engine import (
    BlockSweep,
    GramStat,
    capture_block_inputs,
    run_block_lockstep,
    run_block_plain,
)
from compressor.models.adapters import adapter_for


def _setup(tiny_model_dir, family="gemma3"):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(0))
    chunks = [ids[i : i + 2] for i in range(0, 6, 2)]
    blocks = adapter.blocks(model)
    return model, adapter, chunks, ids, blocks, capture_block_inputs(model, blocks, chunks)


def test_capture_then_blocks_reproduce_the_model(tiny_model_dir):
    """Running the captured calls block by block gives the model's own final hidden states (gemma3 mixes
    sliding and full attention layers, so per-block masks must be captured, not copied from block 0)."""
    model, adapter, chunks, ids, blocks, calls = _setup(tiny_model_dir)
    hidden = calls.hidden
    for i, block in enumerate(blocks):
        hidden = run_block_plain(block, hidden, calls.args[i], calls.kwargs[i])
    with torch.no_grad():
        ref = model.model(input_ids=ids, use_cache=False).last_hidden_state
        ours = model.model.norm(torch.cat(hidden))  # last_hidden_state has the final norm applied
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_block_sweep_runs_every_block_once_and_skipped_blocks_pass_through(tiny_model_dir):
    """The shared true-sequential driver: solved groups see every token; a block the loop body does not run is
    forwarded unchanged, so the sweep's last outputs equal the model's (no solve changed a weight)."""
    model, adapter, chunks, ids, blocks, _ = _setup(tiny_model_dir, "llama")
    sweep = BlockSweep(model, blocks, chunks, torch.float32, track_abs=False)
    counts = {}
    for i, _block in sweep:
        if i % 2 == 0:

            def count(names, stat, i=i):
                counts[(i, names)] = stat.count

            sweep.run(adapter.linear_groups, count)
            with pytest.raises(RuntimeError, match="already run"):
                sweep.run([], lambda names, stat: None)
    assert len(counts) == len(range(0, len(blocks), 2)) * len(adapter.linear_groups)
    assert set(counts.values()) == {6 * 40}
    with torch.no_grad():
        ref = model.model(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(model.model.norm(torch.cat(sweep.hidden)), ref, rtol=1e-5, atol=1e-5)


def test_lockstep_is_one_forward_with_complete_statistics(tiny_model_dir):
    _, adapter, chunks, _, blocks, calls = _setup(tiny_model_dir, "llama")
    block = blocks[0]
    seen = {}
    calls_per_chunk = []
    handle = block.register_forward_pre_hook(lambda m, a: calls_per_chunk.append(1))

    def solve(names, stat: GramStat):
        seen[names] = stat.count

    outs = run_block_lockstep(block, calls.hidden, calls.args[0], calls.kwargs[0], adapter.linear_groups, solve)
    handle.remove()
    assert len(calls_per_chunk) == len(chunks)  # exactly one forward per chunk
    assert set(seen) == set(adapter.linear_groups) and all(c == 6 * 40 for c in seen.values())
    plain = run_block_plain(block, calls.hidden, calls.args[0], calls.kwargs[0])
    for a, b in zip(outs, plain):
        assert torch.equal(a, b)


def test_lockstep_solves_see_quantized_upstream(tiny_model_dir):
    """A solve that zeroes q/k/v makes the o_proj statistics see zero attention output."""
    _, adapter, chunks, _, blocks, calls = _setup(tiny_model_dir, "llama")
    block = blocks[0]
    grams = {}

    def solve(names, stat):
        grams[names] = stat.h.clone()
        if names[0].endswith("q_proj"):
            for n in names:
                block.get_submodule(n).weight.data.zero_()

    run_block_lockstep(block, calls.hidden, calls.args[0], calls.kwargs[0], adapter.linear_groups, solve)
    assert grams[("self_attn.o_proj",)].abs().max() == 0
    assert grams[("mlp.down_proj",)].abs().max() > 0


def test_gram_stat_merges():
    x1, x2 = torch.randn(10, 4), torch.randn(7, 4)
    a, b, c = GramStat(4), GramStat(4), GramStat(4)
    a.add(x1)
    b.add(x2)
    c.add(torch.cat([x1, x2]))
    a.merge(b)
    assert a.count == 17
    torch.testing.assert_close(a.mean(), c.mean())


def _stat_of(windows: list[torch.Tensor], batch: int, **options) -> GramStat:
    stat = GramStat(windows[0].shape[-1], **options)
    for i in range(0, len(windows), batch):
        stat.add(torch.stack(windows[i : i + batch]))
    return stat


@pytest.mark.parametrize("options", [{}, {"product_dtype": torch.bfloat16}, {"token_clip": 3.0}])
def test_gram_statistics_do_not_depend_on_batching_sharding_or_merge_order(options):
    """#28: the float32 statistics solvers read are bit-identical for batch sizes 1/3/8, for 1/2/3 shards merged
    in any order, with bfloat16 products and with the token clip (its threshold is per window)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 33, 40, generator=g) * torch.logspace(-3, 3, 40)  # channels over six decades
    x[5, 7] *= 100  # a massive token
    if options.get("product_dtype") == torch.bfloat16:
        x = x.bfloat16()
    windows = list(x.unbind(0))
    reference = _stat_of(windows, 1, **options)
    expected = (reference.mean(), reference.mean_abs(), reference.count)

    def same(stat: GramStat) -> bool:
        return torch.equal(stat.mean(), expected[0]) and torch.equal(stat.mean_abs(), expected[1])

    for batch in (3, 8):
        assert same(_stat_of(windows, batch, **options)), f"batch size {batch}"
    for shards in (2, 3):
        parts = [_stat_of(list(part), 3, **options) for part in x.tensor_split(shards)]
        for order in (parts, parts[::-1]):
            merged = GramStat(x.shape[-1], **options)
            for part in order:
                merged.merge(part)
            assert merged.count == expected[2] and same(merged), f"{shards} shards"


@pytest.mark.parametrize("shape", [(3, 37, 24), (1, 5, 130)])
def test_bfloat16_gram_keeps_float32_products(shape):
    """bfloat16 inputs: H is the float32-accumulated x^T x, not a product rounded to bfloat16."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    stat = GramStat(shape[-1], product_dtype=torch.bfloat16)
    stat.add(x)
    stat.add(x[:, 1:].transpose(0, 1))  # a non-contiguous batch
    flat = torch.cat([x.reshape(-1, shape[-1]), x[:, 1:].transpose(0, 1).reshape(-1, shape[-1])]).double()
    reference = flat.t() @ flat
    error = (stat.h.double() - reference).abs().max() / reference.diagonal().mean()
    assert error < 1e-6  # a bfloat16-rounded product is off by ~4e-3
    assert stat.count == flat.shape[0]


def test_lockstep_solves_run_in_float32_under_a_bfloat16_forward(tiny_model_dir):
    """The forward runs under bfloat16 autocast; the solve callback (GPTQ) must not: its matmuls stay float32."""
    _, adapter, chunks, _, blocks, calls = _setup(tiny_model_dir, "llama")
    seen = []

    def solve(names, stat):
        a = torch.randn(8, 8)
        seen.append((torch.mm(a, a).dtype, stat.mean().dtype))

    outs = run_block_lockstep(
        blocks[0],
        calls.hidden,
        calls.args[0],
        calls.kwargs[0],
        adapter.linear_groups,
        solve,
        compute_dtype=torch.bfloat16,
    )
    assert seen and all(s == (torch.float32, torch.float32) for s in seen)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    reference = run_block_plain(blocks[0], calls.hidden, calls.args[0], calls.kwargs[0])
    for o, r in zip(outs, reference):
        torch.testing.assert_close(o.float(), r, rtol=0.05, atol=0.05)


def test_lockstep_error_in_a_chunk_surfaces_and_unhooks(tiny_model_dir):
    _, adapter, chunks, _, blocks, calls = _setup(tiny_model_dir, "llama")

    def solve(names, stat):
        raise KeyboardInterrupt  # as Ctrl-C would, in the middle of a block

    with pytest.raises(KeyboardInterrupt):
        run_block_lockstep(blocks[0], calls.hidden, calls.args[0], calls.kwargs[0], adapter.linear_groups, solve)
    assert not blocks[0].self_attn.q_proj._forward_pre_hooks  # hooks removed, the block is usable again
    run_block_plain(blocks[0], calls.hidden, calls.args[0], calls.kwargs[0])
