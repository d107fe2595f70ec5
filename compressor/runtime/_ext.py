"""Loads the optional C++ extension (`compressor._C`) once and says, once, which kernel path is in use."""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger("compressor.runtime")


@functools.cache
def extension_available() -> bool:
    """True when `compressor._C` is built and registered `torch.ops.compressor.*` (announces the path once)."""
    try:
        importlib.import_module("compressor._C")  # registers the ops
        _register_fake_kernels()
    except ImportError as err:
        log.warning(
            "compressor: C++ kernels not built (%s); quantized layers use the pure-torch fallback "
            "(dequantize + matmul). Reinstall with `pip install -e .` to build them.",
            err,
        )
        return False
    log.info("compressor: C++ kernels, CPU ISA %s", torch.ops.compressor.isa())
    return True


def _register_fake_kernels() -> None:
    """Shape-only versions of the GEMM ops, so that torch.compile / FakeTensor tracing can run through them: like
    the kernels, an [M, out_features] view of a float32 [M, Np] buffer (Np = the scales' padded row count);
    dense16_gemm's float32 [M, N]."""

    def int_gemm(x, w, scales, zeros, group_size, out_features, mode=0):
        return x.new_empty((x.shape[0], scales.shape[1]), dtype=torch.float32).narrow(1, 0, out_features)

    def fp8_gemm(x, w, scales, group_size, out_features, mode=0):
        return x.new_empty((x.shape[0], scales.shape[1]), dtype=torch.float32).narrow(1, 0, out_features)

    def dense16_gemm(x, w, bias=None):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    int_ops = ("int2_gemm", "int3_gemm", "int4_gemm", "int8_gemm")
    fakes = [(op, int_gemm) for op in int_ops] + [("fp8_gemm", fp8_gemm), ("dense16_gemm", dense16_gemm)]
    for name, fake in fakes:
        if not hasattr(torch.ops.compressor, name):  # an extension built before the op existed
            continue
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"compressor::{name}", "Meta"):
            torch.library.register_fake(f"compressor::{name}", fake)


def kernels_for(device: torch.device) -> bool:
    """True when the extension has kernels for tensors on this device (CPU always; CUDA when built with it)."""
    if not extension_available():
        return False
    if device.type == "cpu":
        return True
    if device.type == "meta":  # shapes only (the ops' fake kernels): nothing to run
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("compressor::int4_gemm", device.type.upper())


def dense_kernels_for(device: torch.device) -> bool:
    """True when the extension can run `dense16_gemm` (16-bit weights, float32 accumulation) on this device: CPU
    only (on a GPU torch's own 16-bit matmul serves), and an extension built with the op. While torch.compile
    traces, a CPU device is enough: the cached checks are not traced (and without the op the trace fails loudly)."""
    if device.type != "cpu":
        return False
    return torch.compiler.is_compiling() or (extension_available() and _has_dense16())


@functools.cache
def _has_dense16() -> bool:
    return hasattr(torch.ops.compressor, "dense16_gemm")


def current_isa() -> str:
    """The CPU kernel family in use ('avx512', 'avx2', 'scalar'), or 'torch' without the extension."""
    return torch.ops.compressor.isa() if extension_available() else "torch"


def available_isas() -> list[str]:
    """CPU kernel families this machine and build can run (empty without the extension)."""
    return list(torch.ops.compressor.available_isas()) if extension_available() else []


def set_isa(name: str) -> str:
    """Switch the CPU kernel family (like COMPRESSOR_ISA); returns the previous one."""
    if not extension_available():
        raise RuntimeError("compressor: C++ kernels are not built, so there is no ISA to set: pip install -e .")
    return torch.ops.compressor.set_isa(name)
