"""`python -m compressor` (what torchrun starts: `torchrun --nproc-per-node N -m compressor --recipe R ...`)."""

from .cli import main

main()
