"""`compress --nproc N`: start N worker processes through torch's own launcher (torchrun), one machine."""

from __future__ import annotations

import os
import subprocess
import sys


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (then it never launches workers of its own)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N` (the workers run as one process each)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch_workers(nproc: int, argv: list[str]) -> int:
    """Run `python -m compressor ARGV` in `nproc` processes under torchrun (standalone rendezvous on this machine,
    gloo on CPU); returns the exit status: 0 when every worker succeeded, 130 on Ctrl-C, else non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "compressor", *without_nproc(argv)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several workers, said here, not warned
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:  # the workers share our process group: they got the same Ctrl-C
        return 130
