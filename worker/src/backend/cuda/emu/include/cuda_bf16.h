// What `#include <cuda_bf16.h>` finds when the kernels are compiled for the emulated device: the
// bf16 type and conversions are part of the emulation header.
#pragma once
#include "cuda_emu.h"
