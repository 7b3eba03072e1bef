// Shared helpers, prepended by the loader (backend::cuda::kernels) to every kernel file before
// NVRTC compiles it; each file then restarts its line numbers with `#line 1 "<file>.cu"` so
// NVRTC's log names the file and line a person can open.
//
// Conventions of every kernel file:
// - Every kernel is `extern "C"` (its name is the symbol the host loads) and carries a comment
//   naming the CPU function it must match: `CPU reference: backend::cpu::<file>::<fn>`.
// - Shapes use the crate glossary: B, T, C, NH, hs = C/NH, Vp, OC, N = B·T rows.
// - Sizes that can pass 2^31 elements (L·B·T·4C, Vp·C, B·T·Vp) are indexed with `long long`.
// - Reductions run in a fixed order for a fixed launch shape, so a kernel is bit-reproducible
//   run to run; only the kernels marked "atomics" are not.
#include <cuda_bf16.h>

#define LD_WARP 32
// +∞ without <math.h> (NVRTC has no standard headers).
#define LD_INF __int_as_float(0x7f800000)
#define LD_FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LD_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LD_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(LD_FULL_MASK, v, o));
    return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32.
// The leading barrier lets a kernel call it more than once (the scratch is reused).
__device__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x % LD_WARP, wid = threadIdx.x / LD_WARP;
    const int nw = blockDim.x / LD_WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Maximum over the block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ float block_max(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x % LD_WARP, wid = threadIdx.x / LD_WARP;
    const int nw = blockDim.x / LD_WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -LD_INF;
    return warp_max(v);
}

// Sum in double over the block; every thread gets the result.
__device__ double block_sum_d(double v) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x % LD_WARP, wid = threadIdx.x / LD_WARP;
    const int nw = blockDim.x / LD_WARP;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
    return warp_sum_d(v);
}

__device__ __forceinline__ long long global_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
