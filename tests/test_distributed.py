"""Distributed runs (#28): `compress --nproc 2` (two gloo processes on loopback, started through torchrun) writes the
artifact one process writes, byte for byte but for what measures the run itself (timings, memory, tok/s); and 3
processes for w4-gptq."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import compressor
from compressor.commands.launch import without_nproc

RECIPE_DIR = Path(compressor.__file__).parent / "recipes"

# what one run measures about itself, not about the model (removed before comparing)
VOLATILE_REPORT_KEYS = {"timings", "peak_rss_mb", "processes", "seconds", "decode_tokens_per_s", "prefill_tokens_per_s"}
VOLATILE_SUMMARY_LINES = ("- greedy sample:", "- time:", "- peak memory")
SMALL = [
    "calibration.num_samples=12",
    "calibration.seq_len=64",
    "calibration.batch_size=2",
    "evaluate.seq_len=64",
    "evaluate.max_windows=3",  # 3 batches of 1: the 2 processes evaluate 1 and 2 of them
    "evaluate.batch_size=1",
]
RECIPES = {  # case: (bundled recipe, its --set options)
    "w4-gptq": ("w4-gptq", []),
    "w4-gptq-awq": ("w4-gptq", ["passes.0.awq=true"]),
    "w4-layerwise": ("w4-layerwise", ["passes.0.num_samples=4"]),
    "prune25-w4": ("prune25-w4", ["passes.0.measure_samples=2", "passes.1.measure_samples=2"]),
    # block fusion: windows and fits shared among the processes (3 and 4 chunks of windows)
    "fuse-angular-w4": ({"type": "fuse_blocks", "count": 1, "max_samples": 12, "measure_batch_size": 1}, []),
    "fuse-check-w4": (
        {"type": "fuse_blocks", "select": "check", "count": 1, "threshold": 0.1, "measure_samples": 4},
        ["passes.0.measure_batch_size=1"],
    ),
}


def _compress(case: str, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    recipe, own = RECIPES[case]
    if isinstance(recipe, dict):  # a structural pass before w4-gptq's quantize pass
        path = out.parent / f"{case}.yaml"
        quantize = yaml.safe_load((RECIPE_DIR / "w4-gptq.yaml").read_text())
        path.write_text(yaml.safe_dump({**quantize, "passes": [recipe, *quantize["passes"]]}))
        recipe = str(path)
    sets = [arg for s in SMALL + own for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "compressor", "--recipe", recipe, "--model", str(model), "-o", str(out), "-q"]
    # one thread per process in both runs; a cache of its own, so each run measures its sensitivities itself
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COMPRESSOR_CACHE_DIR=str(out) + "-cache")
    return subprocess.run(cmd + sets + list(extra), capture_output=True, text=True, env=env, timeout=600)


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_REPORT_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _fingerprint(folder: Path) -> dict[str, str]:
    """Each file's hash; report.json without what the run measures about itself, summaries without those lines."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "report.json":
            data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
        elif path.suffix == ".md":
            lines = data.decode().splitlines()
            data = "\n".join(x for x in lines if not x.lstrip().startswith(VOLATILE_SUMMARY_LINES)).encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.parametrize("case, nproc", [(c, 2) for c in sorted(RECIPES)] + [("w4-gptq", 3), ("w4-layerwise", 3)])
def test_several_processes_write_the_one_process_artifact(case, nproc, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    one = _compress(case, model, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _compress(case, model, tmp_path / "two", "--nproc", str(nproc))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes and says so
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    processes = report["processes"]
    assert processes["count"] == nproc and len(processes["peak_rss_mb_after_passes"]) == nproc
    assert all(sent > 0 for sent in processes["bytes_sent"])  # statistics and evaluation sums went both ways
    a, b = _fingerprint(tmp_path / "one"), _fingerprint(tmp_path / "two")
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []


def test_a_timed_allocation_search_runs_on_one_process(tiny_model_dir, tmp_path):
    """`method: search` has a wall-time budget (its result depends on the machine's speed): with 2 processes one
    searches and both quantize with its allocation, so the run completes and agrees with itself."""
    done = _compress(
        "w4-layerwise",
        tiny_model_dir("llama"),
        tmp_path / "o",
        *("--set", "passes.0.method=search", "--set", "passes.0.search_seconds=2", "--nproc", "2"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["processes"]["count"] == 2 and "search" in report["allocation"]["timings"]


def test_too_few_calibration_chunks_for_the_processes(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    cmd = [sys.executable, "-m", "compressor", "--recipe", "w4-gptq", "--model", str(model), "-o", str(tmp_path / "o")]
    cmd += ["--set", "calibration.num_samples=2", "--set", "calibration.batch_size=2", "--set", "evaluate=null"]
    cmd += ["--set", "calibration.seq_len=64"]
    cmd += ["--nproc", "2", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == done.stderr.strip().splitlines()[0], done.stderr  # one line, before any worker
    assert done.stderr.startswith("error: 1 calibration chunks cannot be shared by 2 processes")
    assert not (tmp_path / "o").exists()


def test_a_bad_recipe_is_refused_before_any_worker_starts(tmp_path):
    cmd = [sys.executable, "-m", "compressor", "--recipe", "w4-gptq", "-o", str(tmp_path / "o"), "--nproc", "2"]
    cmd += ["--set", "calibration.num_samples=-1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "torch.distributed" not in done.stderr


def test_nproc_is_taken_off_the_workers_command_line():
    assert without_nproc(["--recipe", "r", "--nproc", "2", "-q"]) == ["--recipe", "r", "-q"]
    assert without_nproc(["--nproc=3", "--recipe", "r"]) == ["--recipe", "r"]


def _faulty_run(model: Path, out: Path, fault: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "compressor", "--recipe", "w4-gptq", "--model", str(model), "-o", str(out), "-q"]
    cmd += [arg for s in SMALL for arg in ("--set", s)] + ["--nproc", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", COMPRESSOR_TEST_FAULT=fault)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


@pytest.mark.parametrize(
    "fault, says",
    [
        ("1:raise", "worker rank 1 of 2 exited with code 1"),
        ("1:kill", "worker rank 1 of 2 was killed by SIGKILL"),
        ("0:kill", "worker rank 0 of 2 was killed by SIGKILL"),
    ],
)
def test_a_failed_worker_stops_every_worker(fault, says, tiny_model_dir, tmp_path):
    """#28 faults: a rank that raises or is SIGKILLed while the others wait in a collective: every worker stops
    within a bounded time, the exit is non-zero, one line names the rank and the cause, and nothing is written."""
    start = time.monotonic()
    run = _faulty_run(tiny_model_dir("llama"), tmp_path / "out", fault)
    _, err = run.communicate(timeout=240)
    assert run.returncode != 0
    assert time.monotonic() - start < 240
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {says}") and "nothing was written" in last, err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_every_worker_with_130(tiny_model_dir, tmp_path):
    """Ctrl-C from a terminal reaches the launcher and every worker (one process group): all stop, exit 130."""
    run = _faulty_run(tiny_model_dir("llama"), tmp_path / "out", "1:sleep", start_new_session=True)
    time.sleep(12)  # the workers are loading or calibrating (rank 1 sleeps at its first reduction)
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # nothing of the run is left
        os.killpg(run.pid, 0)


def test_balanced_owners_give_the_longest_jobs_first_to_the_least_loaded_rank():
    from compressor.calibration.ranks import balanced_owners

    assert balanced_owners([5, 1, 4, 3, 3], 2) == [0, 1, 1, 1, 0]  # loads 8 and 8
    assert balanced_owners([2, 2, 2], 1) == [0, 0, 0]
    assert balanced_owners([1, 1], 3) == [0, 1]


def test_factorizations_do_not_depend_on_the_thread_count():
    """2 processes x 1 thread must write what 1 process x 2 threads writes: LAPACK factorizations split their
    work by thread count (different last bits), so the solvers run them on one thread."""
    import torch

    from compressor.quant.linalg import damped_cholesky
    from compressor.quant.lowrank import whitened_lowrank

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1280, generator=g) * torch.logspace(-1, 1, 1280)
    h, e = x.t() @ x / 2048, torch.randn(64, 1280, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            factor, _ = next(damped_cholesky(h, 0.01, h.diagonal().mean().item()))
            low = whitened_lowrank(e, h, 8)
            results.append((factor, low.down, low.up))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_decision_sums_do_not_depend_on_the_thread_count():
    """The sums that allocations and activation scales are chosen by (predicted KL, output error) add in a fixed
    order: a plain multi-threaded float32 sum changes its last bits with the thread count."""
    import torch

    from compressor.allocate.fisher import predicted_kl
    from compressor.quant.linalg import output_error

    g = torch.Generator().manual_seed(1)
    grad, h, dw = torch.randn(1536, 1536, generator=g), torch.randn(576, 576, generator=g), torch.randn(1536, 576)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((predicted_kl(grad, h, dw), output_error(dw, h)))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]
