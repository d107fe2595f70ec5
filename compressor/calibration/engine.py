"""Block-sequential calibration: embeddings once, then each block on the cached outputs of the block before.

Three separate steps, so a later streaming / distributed engine can swap any of them:
  1. `capture_block_inputs`: one forward through the embeddings; every block's call arguments (masks,
     position embeddings) are recorded and the model stops before the first block's computation.
  2. statistics: `GramStat` keeps mergeable sums (sum x x^T, token count) that ranks could all-reduce.
  3. solving: a callback the pass provides, given a group of linears and its statistics.

`run_block_lockstep` runs a block over all calibration chunks in ONE forward pass: each chunk runs in its
own greenlet, chunks take turns in order (one computes at a time, so results are deterministic), and
when the last chunk reaches a linear group the group is solved and quantized in place. The remaining part
of the forward then uses the quantized weights, so every linear sees inputs produced by the already-quantized
linears before it (true-sequential GPTQ) and the block's outputs are the quantized block's outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blas import add_gram


def limit_malloc_fragmentation() -> None:
    """Keep glibc from hoarding freed activation memory (threads of the torch runtime, calibration chunks).

    Threads would otherwise get malloc arenas of their own and, with glibc's dynamic mmap threshold,
    large freed tensors stay in those arenas: measured on SmolLM2 (128 x 512 tokens) one block left RSS at
    2.7 GB instead of 1.3 GB. A fixed 1 MB mmap threshold returns large blocks to the OS on free (a bfloat16
    SmolLM2 block peaked ~100 MB lower than with 4 MB).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 2)


def return_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim); called between blocks of a sweep, when the
    previous block's activations are gone, so fragmentation does not ratchet the resident set up block by block."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB. Linux: the memory map's high-water mark (VmHWM), which
    starts afresh at exec; ru_maxrss does not (it keeps the parent's peak at fork), so a `compress` started
    from a big benchmark process would report the parent's memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform.startswith("linux") else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / scale


def _no_op(*_args) -> None:
    return None


@dataclass
class Residency:
    """How a sweep brings a block's weights into memory and lets them go again (streamed models: from and back to
    the checkpoint); the defaults do nothing (a model loaded whole). `outside` = embeddings, final norm, head."""

    load_block: Callable[[int], None] = _no_op
    release_block: Callable[[int], None] = _no_op
    load_outside: Callable[[], None] = _no_op
    release_outside: Callable[[], None] = _no_op


class _StopCapture(Exception):
    pass


@dataclass
class BlockCalls:
    """Inputs of block 0 and the extra call arguments of every block, per calibration chunk."""

    hidden: list[torch.Tensor]  # per chunk, input of the next block to run
    args: list[list[tuple]]  # [block][chunk] extra positional args
    kwargs: list[list[dict]]  # [block][chunk] keyword args

    def cast_floats(self, dtype: torch.dtype) -> None:
        """Cast every floating tensor (hidden states, position embeddings, float masks) to `dtype` in place of the
        originals; a tensor shared by several blocks' calls (position embeddings are) stays shared."""
        memo: dict[int, torch.Tensor] = {}
        self.hidden = [_cast_floats(h, dtype, memo) for h in self.hidden]
        self.args = [[_cast_floats(a, dtype, memo) for a in per_block] for per_block in self.args]
        self.kwargs = [[_cast_floats(k, dtype, memo) for k in per_block] for per_block in self.kwargs]


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, chunks: Sequence[torch.Tensor]) -> BlockCalls:
    """Run the embeddings for every chunk of input ids and record what each block is called with."""
    n_blocks = len(blocks)
    calls = BlockCalls(hidden=[], args=[[] for _ in blocks], kwargs=[[] for _ in blocks])

    def recorder(index: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                calls.hidden.append(hidden.detach())
            calls.args[index].append(rest)
            calls.kwargs[index].append(kwargs)
            if index == n_blocks - 1:
                raise _StopCapture
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        with torch.inference_mode():
            for ids in chunks:
                with contextlib.suppress(_StopCapture):
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for block in blocks:
            del block.forward
    return calls


class GramStat:
    """Mergeable input statistics of one linear group: H = sum over tokens of x x^T, and the token count.

    Exact merging: the unit of accumulation is one calibration window (a sequence: the leading indices of what
    `add` gets). Each window's x^T x is one float32 product (float32-accumulated from bfloat16 inputs), and the
    windows' products are summed in float64, where every float32 term is exact and a sum of a few thousand of them
    rounds, if at all, 29 bits below float32's precision. So the float32 statistics the solvers read (`mean`,
    `mean_abs`) do not depend on the batch size, on how windows are split into chunks or shards, or on the order
    in which partial statistics `merge` (tests/test_engine.py checks bit equality for batch sizes 1/3/8 and
    1/2/3 shards). The float64 sums take twice the memory of a float32 H.

    `token_clip` (optional) caps each token's norm at `token_clip` x the median token norm of its window before it
    enters H (a per-window threshold, so it too is the same however windows are batched). Small LMs put "massive
    activations" on a few attention-sink tokens (SmolLM2's late down_proj inputs: 47x the median norm); unclipped,
    those few tokens dominate H. Off by default: with act-order and diag(H)-weighted clipping it cost perplexity
    on SmolLM2 (README, issue #32).
    """

    def __init__(
        self,
        width: int,
        token_clip: float | None = None,
        product_dtype: torch.dtype = torch.float32,
        track_abs: bool = True,
        keep_unclipped: bool = False,
    ):
        self.h = torch.zeros(width, width, dtype=torch.float64)  # sum over windows of each window's x^T x
        # the Gram matrix before the token clip, kept on request (GPTQ diagnostics) when there is a clip
        self.h_unclipped = torch.zeros_like(self.h) if keep_unclipped and token_clip is not None else None
        self.abs_sum = torch.zeros(width, dtype=torch.float64)  # per-channel sum |x| (activation-aware scaling)
        self.count = 0
        self.token_clip = token_clip
        self.product_dtype = product_dtype
        self.track_abs = track_abs  # only activation-aware scaling reads abs_sum

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., tokens, width]: every leading index is one window ([tokens, width]: one).

        With `product_dtype` bfloat16, each window's x^T x takes bfloat16 inputs and accumulates in float32
        (`blas.add_gram`): 5x faster than a float32 product on AMX, no rounding of the product to bfloat16.
        """
        with torch.autocast(x.device.type, enabled=False):
            windows = x.reshape(-1, *x.shape[-2:]).to(self.product_dtype)
            for window in windows:  # bfloat16: no float32 copy of the batch
                self._add_window(window)

    def _add_window(self, x: torch.Tensor) -> None:
        if self.track_abs:  # unclipped: activation-aware scaling sees the channels' real magnitudes
            self.abs_sum += x.abs().sum(0, dtype=torch.float32)
        if self.h_unclipped is not None:
            self.h_unclipped += self._gram(x)
        if self.token_clip is not None and x.shape[0] > 1:
            x = self._clipped(x)
        self.h += self._gram(x)
        self.count += x.shape[0]

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        """x^T x of one window, float32."""
        if self.product_dtype == torch.float32:
            return torch.mm(x.t(), x)
        g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
        add_gram(g, x)
        return g

    def _clipped(self, x: torch.Tensor) -> torch.Tensor:
        """x with every token norm capped at `token_clip` x the window's median (x itself when none exceeds it)."""
        ones = torch.ones(x.shape[1], 1, dtype=x.dtype)
        norms = torch.mm(x * x, ones).to(torch.float32).squeeze(1).clamp_min(0).sqrt()  # float32-accumulated |x|
        limit = self.token_clip * norms.median()
        if not bool((norms > limit).any()):
            return x
        return x * torch.clamp(limit / norms.clamp_min(1e-12), max=1.0).to(x.dtype)[:, None]

    def merge(self, other: GramStat) -> None:
        """Add another shard's statistics (any order of merging gives the same float32 results)."""
        self.h += other.h
        if self.h_unclipped is not None:
            self.h_unclipped += other.h_unclipped
        self.abs_sum += other.abs_sum
        self.count += other.count

    def mean(self) -> torch.Tensor:
        """H / tokens, float32."""
        return (self.h / max(self.count, 1)).to(torch.float32)

    def mean_unclipped(self) -> torch.Tensor:
        """`mean()` before the token clip (the same when there is no clip; needs `keep_unclipped` when there is)."""
        if self.token_clip is not None and self.h_unclipped is None:
            raise ValueError("GramStat made without keep_unclipped: the unclipped statistics were not kept")
        if self.h_unclipped is None:
            return self.mean()
        return (self.h_unclipped / max(self.count, 1)).to(torch.float32)

    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean |x|, float32."""
        return (self.abs_sum / max(self.count, 1)).to(torch.float32)

    def rescale_inputs(self, divisor: torch.Tensor) -> None:
        """The statistics of x / divisor (after an activation-aware scale was folded upstream)."""
        d = divisor.to(torch.float64)
        self.h /= d[:, None] * d[None, :]
        if self.h_unclipped is not None:
            self.h_unclipped /= d[:, None] * d[None, :]
        self.abs_sum /= d


SolveFn = Callable[[tuple[str, ...], GramStat], "torch.Tensor | None"]
ReduceFn = Callable[[GramStat], None]  # replaces a rank's partial statistics by their sum over ranks


def run_block_lockstep(
    block: nn.Module,
    hidden: list[torch.Tensor],
    args: list[tuple],
    kwargs: list[dict],
    groups: Sequence[tuple[str, ...]],
    solve: SolveFn,
    token_clip: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    consume_inputs: bool = False,
    track_abs: bool = True,
    keep_unclipped: bool = False,
    reduce: ReduceFn | None = None,
) -> list[torch.Tensor]:
    """Forward every chunk through `block` once, solving each linear group when all chunks reached it.

    Each chunk's forward runs in its own greenlet (a coroutine on this thread): at a group's first linear the chunk
    adds its input to the group's statistics and yields; chunks take turns in order, so the results are
    deterministic, and the last chunk to arrive solves the group before anyone continues. One OS thread means one
    OpenMP team and no locks (threads per chunk cost ~15% of the block time on 2 cores).

    `solve(names, stat)` must replace the weights of the named linears (in place) before returning. It may
    return a per-channel divisor: it has folded 1/divisor into what produces the group's input (a norm or an
    earlier linear), so inputs already computed by waiting chunks are divided by it here. Returns the outputs.

    `compute_dtype` bfloat16 runs the block under autocast (matmuls in bfloat16, float32 master weights; solves run
    with autocast off, so they and the weight write-backs stay float32) and returns bfloat16 outputs (statistics:
    see GramStat). `consume_inputs` drops each chunk's input from `hidden` once its output exists. `keep_unclipped`:
    see GramStat. `reduce` (distributed runs) sums a group's statistics over ranks before its solve.

    The steps:
      1. `_Lockstep` holds the shared state; a forward pre-hook on every linear of every group gathers the chunk's
         input into the group's `GramStat`, solves the group on the last chunk's arrival, and pauses the chunk.
      2. with a narrower `compute_dtype`, norm outputs and the float call arguments are cast to it.
      3. `_chunk_greenlets` makes one greenlet per chunk; `_take_turns` switches to them in order, round after
         round, until every forward has finished.
      4. the hooks go, unfinished greenlets are unwound, and a group no chunk reached is an error.
    """
    n = len(hidden)
    lockstep = _Lockstep(groups, solve, n, token_clip, compute_dtype, track_abs, keep_unclipped, reduce)
    outputs: list[torch.Tensor | None] = [None] * n
    handles = _register_group_hooks(block, groups, lockstep)
    if compute_dtype != torch.float32:
        handles += _narrow_norm_outputs(block, compute_dtype)
        args = [_cast_floats(a, compute_dtype) for a in args]
        kwargs = [_cast_floats(k, compute_dtype) for k in kwargs]
    chunks = _chunk_greenlets(block, hidden, args, kwargs, outputs, compute_dtype, consume_inputs)
    try:
        # grad / inference mode and autocast are per-thread state: entered once here, shared by every chunk
        with torch.inference_mode(), _autocast(hidden[0].device, compute_dtype):
            _take_turns(chunks, lockstep)
    finally:
        for h in handles:
            h.remove()
        # unfinished greenlets are unwound (GreenletExit) and their activations freed now; clear() rather than del:
        # on an error the traceback still holds _take_turns' frame, which holds this list
        chunks.clear()
    lockstep.check_all_solved()
    return [o for o in outputs if o is not None]


class _Lockstep:
    """The state the chunks of one `run_block_lockstep` share: whose turn it is, the statistics of the groups not
    solved yet, the solved groups and the input divisors their solves returned."""

    def __init__(
        self,
        groups: Sequence[tuple[str, ...]],
        solve: SolveFn,
        n_chunks: int,
        token_clip: float | None,
        compute_dtype: torch.dtype,
        track_abs: bool,
        keep_unclipped: bool = False,
        reduce: ReduceFn | None = None,
    ):
        from greenlet import getcurrent

        self.groups, self.solve, self.n_chunks = groups, solve, n_chunks
        self.token_clip, self.compute_dtype, self.track_abs = token_clip, compute_dtype, track_abs
        self.keep_unclipped, self.reduce = keep_unclipped, reduce
        self.scheduler = getcurrent()  # the greenlet that runs `_take_turns`
        self.running = 0  # index of the chunk whose greenlet runs now
        self.stats: dict[int, GramStat] = {}
        self.done: set[int] = set()
        self.divisors: dict[int, torch.Tensor] = {}

    def pre_hook(self, gi: int) -> Callable:
        """Forward pre-hook of group `gi`'s linears: until the group is solved, gather the input and yield to the
        next chunk; returns the input divided by the group's divisor when its solve returned one."""

        def pre_hook(module, inputs):
            if gi not in self.done:
                self._gather(gi, inputs[0])
                self.scheduler.switch()  # next chunk's turn
            return self._scaled(gi, inputs)

        return pre_hook

    def _gather(self, gi: int, x: torch.Tensor) -> None:
        """Add a chunk's input to the group's statistics; the last chunk solves the group before anyone goes on."""
        stat = self.stats.get(gi)
        if stat is None:
            stat = GramStat(x.shape[-1], self.token_clip, self.compute_dtype, self.track_abs, self.keep_unclipped)
            self.stats[gi] = stat
        stat.add(x)
        if self.running == self.n_chunks - 1:  # every chunk has contributed
            self._solve(gi, stat, x.device.type)

    def _solve(self, gi: int, stat: GramStat, device_type: str) -> None:
        if self.reduce is not None:
            self.reduce(stat)
        with torch.autocast(device_type, enabled=False):  # solves stay float32 under a bf16 forward
            divisor = self.solve(self.groups[gi], stat)
        if divisor is not None:
            self.divisors[gi] = divisor
        self.done.add(gi)
        del self.stats[gi]

    def _scaled(self, gi: int, inputs: tuple) -> tuple | None:
        d = self.divisors.get(gi)
        return None if d is None else (inputs[0] / d.to(inputs[0].dtype), *inputs[1:])

    def check_all_solved(self) -> None:
        missing = [self.groups[gi] for gi in range(len(self.groups)) if gi not in self.done]
        if missing:
            raise RuntimeError(f"calibration never reached linears {missing}; the adapter's names are wrong")


def _register_group_hooks(block: nn.Module, groups: Sequence[tuple[str, ...]], lockstep: _Lockstep) -> list:
    """The lockstep pre-hook on every linear of every group; returns the handles."""
    handles = []
    for gi, names in enumerate(groups):
        for name in names:
            handles.append(block.get_submodule(name).register_forward_pre_hook(lockstep.pre_hook(gi)))
    return handles


def _chunk_greenlets(
    block: nn.Module,
    hidden: list[torch.Tensor],
    args: list[tuple],
    kwargs: list[dict],
    outputs: list[torch.Tensor | None],
    compute_dtype: torch.dtype,
    consume_inputs: bool,
) -> list:
    """One greenlet per chunk, each running the block on its chunk and storing the output in `outputs`."""
    from greenlet import greenlet

    def work(i: int) -> None:
        out = block(hidden[i], *args[i], **kwargs[i])
        if consume_inputs:
            hidden[i] = None
        outputs[i] = (out[0] if isinstance(out, tuple) else out).to(compute_dtype)

    return [greenlet(lambda i=i: work(i)) for i in range(len(hidden))]


def _take_turns(chunks: list, lockstep: _Lockstep) -> None:
    """Switch to every live chunk in order, round after round, until each one's forward has finished."""
    live = list(range(len(chunks)))
    while live:
        for i in live:
            lockstep.running = i
            chunks[i].switch()  # an exception (or Ctrl-C) in a chunk surfaces here
        live = [i for i in live if not chunks[i].dead]


def _cast_floats(obj, dtype: torch.dtype, memo: dict | None = None):
    """Floating tensors inside args / kwargs (position embeddings, float masks) cast to `dtype` (no copy when they
    already are); `memo` (id -> cast tensor) keeps a tensor shared between calls shared."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point() or obj.dtype == dtype:
            return obj
        if memo is None:
            return obj.to(dtype)
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(dtype)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype, memo) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype, memo) for k, v in obj.items()}
    return obj


def _narrow_norm_outputs(block: nn.Module, dtype: torch.dtype) -> list:
    """Forward hooks that cast norm outputs to `dtype`. Under autocast a norm with a float32 weight returns
    float32, which every chunk paused at the next linear would hold; the linear casts it to `dtype` anyway, so the
    numerics are unchanged and the paused activations take half the memory."""

    def narrow(module, inputs, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    return [m.register_forward_hook(narrow) for m in block.modules() if "Norm" in type(m).__name__]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_compute_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The calibration forward's dtype: 'float32', 'bfloat16', or 'auto' = bfloat16 on a CUDA device, else float32.

    A CPU with AMX / AVX512-BF16 runs bfloat16 faster, but on SmolLM2 W4 g64 GPTQ bfloat16 hidden states between
    blocks cost quality (64 wikitext windows: +24.7% perplexity over base against +21.9% in float32, KL 0.206
    against 0.201; README, issue #32), so CPU runs stay in float32 unless a recipe asks for bfloat16."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


class BlockSweep:
    """Calibration chunks through a model's blocks one block at a time, each block's linear groups solved in
    lockstep (`run_block_lockstep`) on inputs the already-solved blocks produced: the one true-sequential driver
    that the quantize pass, the low-rank spectra and the allocation check's GPTQ error model share.

        sweep = BlockSweep(model, blocks, chunks, compute_dtype, token_clip=..., track_abs=...)
        for i, block in sweep:
            sweep.run(groups, solve)   # solve the block's groups and move its outputs on to the next block

    The embeddings run once at construction (`capture_block_inputs`); each block's input is dropped as soon as
    its output exists, so a sweep holds one block's activations. A block the loop body leaves without `run` is
    forwarded unchanged. In a distributed run `chunks` are this rank's share and `reduce` (`Ranks.reduce_gram`)
    sums each group's statistics over the ranks before it is solved."""

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        chunks: Sequence[torch.Tensor],
        compute_dtype: torch.dtype,
        *,
        token_clip: float | None = None,
        track_abs: bool = True,
        keep_unclipped: bool = False,
        reduce: ReduceFn | None = None,
    ):
        self.blocks, self.compute_dtype, self.reduce = blocks, compute_dtype, reduce
        self.token_clip, self.track_abs, self.keep_unclipped = token_clip, track_abs, keep_unclipped
        self.calls = capture_block_inputs(model, blocks, chunks)
        self.calls.cast_floats(compute_dtype)
        self.hidden, self.calls.hidden = self.calls.hidden, []
        self._index, self._ran = -1, True

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        for i, block in enumerate(self.blocks):
            return_free_memory()
            self._index, self._ran = i, False
            yield i, block
            if not self._ran:
                self.run([], lambda names, stat: None)

    def run(self, groups: Sequence[tuple[str, ...]], solve: SolveFn) -> None:
        """Forward the current block on every chunk, solving `groups` (names inside the block) with `solve`."""
        i = self._index
        if self._ran:
            raise RuntimeError(f"block {i} of the sweep was already run")
        self.hidden = run_block_lockstep(
            self.blocks[i],
            self.hidden,
            self.calls.args[i],
            self.calls.kwargs[i],
            groups,
            solve,
            self.token_clip,
            self.compute_dtype,
            consume_inputs=True,
            track_abs=self.track_abs,
            keep_unclipped=self.keep_unclipped,
            reduce=self.reduce,
        )
        self._ran = True


@contextlib.contextmanager
def replaying_last_block(blocks: nn.ModuleList, last_output: torch.Tensor, tuple_output: bool = False):
    """Inside, every block passes its input through and the last one returns `last_output`: the model's own forward
    then computes only what comes after the blocks (final norm, projections, head, softcaps) from it, so each
    family's post-block code is used as is. `tuple_output`: the blocks return tuples (as the real ones do)."""

    def through(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) if tuple_output else x

    def final(*args, **kwargs):
        return (last_output,) if tuple_output else last_output

    for block in blocks:
        block.forward = through
    blocks[len(blocks) - 1].forward = final
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def head_logits(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Logits the model computes when its last block outputs `final` [B, S, hidden] for the ids [B, S] (final norm,
    projections, head, softcaps: the model's own post-block code, `replaying_last_block`). Each position's logits
    depend on that position alone, so slices of positions give slices of the logits."""
    with replaying_last_block(blocks, final), torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def final_hidden_block_by_block(
    model: nn.Module, blocks: nn.ModuleList, chunks: Sequence[torch.Tensor], residency: Residency
) -> list[torch.Tensor]:
    """The last block's outputs for every chunk of ids, block-major: each block brought in once (`residency`), run on
    every chunk and let go, so one block's weights and two boundaries of activations are in memory."""
    calls = capture_block_inputs(model, blocks, chunks)
    hidden = calls.hidden
    for i, block in enumerate(blocks):
        residency.load_block(i)
        hidden = run_block_plain(block, hidden, calls.args[i], calls.kwargs[i])
        residency.release_block(i)
        return_free_memory()
    return hidden


def run_block_plain(block: nn.Module, hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict]):
    """Forward every chunk through `block` (no statistics)."""
    outs = []
    with torch.inference_mode():
        for h, a, k in zip(hidden, args, kwargs):
            out = block(h, *a, **k)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs
