// The emulation's one piece of state on the C++ side: which GPU thread (fiber) is running on
// this OS thread. The runtime (runtime.rs) sets it before it resumes a fiber; the header's
// threadIdx, blockIdx, blockDim and gridDim read it.
#include "cuda_emu.h"

__thread const ld_emu_thread_ctx* ld_emu_self = nullptr;

extern "C" void ld_emu_set_self(const ld_emu_thread_ctx* ctx) { ld_emu_self = ctx; }
