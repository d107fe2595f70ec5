// Stand-in for the header a CUDA build of torch generates (absent from CPU wheels); used only by the nvcc
// compile check in .ci/run, never by setup.py, which builds CUDA sources only against a CUDA torch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
