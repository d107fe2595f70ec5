"""Build of the optional C++/CUDA extension `compressor._C` (metadata lives in pyproject.toml).

The CPU kernels are one translation unit per ISA with its own flags (never -march=native); the extension picks
one at run time. CUDA sources are added only when torch is a CUDA build and a CUDA toolkit is present. A failed
compile prints a warning and the package installs without the extension (compressor falls back to pure torch).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX512_FLAGS = [
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mavx512bf16",
]
# GCC 12's AVX-512 intrinsics seed their pass-through operand with _mm512_undefined_*(), which -Wall reports as
# "may be used uninitialized" wherever one is inlined (84 false reports at 1ba8bca, 210 with 16-bit scales)
# that would hide a real one; the other files keep the warning.
SIMD_QUIET = ["-Wno-maybe-uninitialized"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
ISA_FLAGS = {
    # one ISA's kernels, split by job (table + activation quantization, int8 activations, float activations)
    "kernels_avx2.cpp": AVX2_FLAGS,
    "kernels_avx2_q8.cpp": AVX2_FLAGS,
    "kernels_avx2_f32.cpp": AVX2_FLAGS,
    "kernels_avx512.cpp": AVX512_FLAGS + SIMD_QUIET,
    "kernels_avx512_q8.cpp": AVX512_FLAGS + SIMD_QUIET,
    "kernels_avx512_f32.cpp": AVX512_FLAGS + SIMD_QUIET,
    "kernels_amx.cpp": AVX512_FLAGS + SIMD_QUIET + ["-mamx-tile", "-mamx-int8"],
    # dense 16-bit weights: float32 FMAs only (no VNNI, and no bfloat16 dot products, which round activations)
    "kernels_dense_avx2.cpp": AVX2_FLAGS,
    "kernels_dense_avx512.cpp": AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"] + SIMD_QUIET,
}


def _want_cuda(torch) -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("COMPRESSOR_NO_CUDA") != "1"


def _extensions():
    if os.environ.get("COMPRESSOR_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("compressor: torch not importable at build time; building without the C++ extension", file=sys.stderr)
        return [], {}

    class OptionalBuild(BuildExtension):
        """Per-file ISA flags; a failed extension build warns instead of failing the install."""

        def build_extension(self, ext):
            original = self.compiler._compile

            def compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = ISA_FLAGS.get(Path(src).name, []) if X86 else []
                if isinstance(extra_postargs, dict):
                    extra_postargs = {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + extra}
                else:
                    extra_postargs = list(extra_postargs) + extra
                return original(obj, src, ext_, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = compile_one
            try:
                super().build_extension(ext)
            except Exception as err:  # any compiler/linker failure: install without the extension
                print(
                    f"compressor: WARNING: the C++ extension failed to build ({err}); "
                    "compressor will use its pure-torch fallback",
                    file=sys.stderr,
                )
            finally:
                self.compiler._compile = original

    sources = [f"{CSRC}/ops.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cpu").glob("*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code, compiled serial without it. The libgomp.so.1 it links is
    # the one torch's CPU wheel bundles (same soname, already loaded by `import torch`).
    # -fno-wrapv: the compile line starts with Python's own CFLAGS, which carry -fwrapv (signed overflow wraps);
    # it cost the cache-cold AVX-512 GEMV about 10% of its read bandwidth (84-89% of the probe against 94-102%
    # for the same source without it, alternating builds of a C++ harness). Nothing here relies on wrapping.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-fno-wrapv"]
    # headers as dependencies: an edit of kernels.h alone rebuilds the extension (setuptools checks only sources)
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).rglob("*.h"))
    link = ["-fopenmp"]
    if _want_cuda(torch):
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cuda").glob("*.cu"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DCOMPRESSOR_CUDA"]
        ext = CUDAExtension(
            "compressor._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DCOMPRESSOR_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
            depends=headers,
        )
    else:
        ext = CppExtension(
            "compressor._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, depends=headers
        )
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
