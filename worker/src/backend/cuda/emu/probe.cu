// Kernels that exercise the emulation itself (worker/tests/cuda_emu.rs), compiled only for the
// emulated device: indices, shuffles, barriers, shared memory, atomics, bf16 rounding, and
// kernels that break the rules on purpose so the tests can see the emulator refuse them.

// out[linear global thread] = threadIdx.x | y << 8 | z << 16, and blockIdx likewise in out2.
extern "C" __global__ void probe_indices(int* out, int* out2) {
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int nthreads = blockDim.x * blockDim.y * blockDim.z;
    out[bid * nthreads + tid] = threadIdx.x | (threadIdx.y << 8) | (threadIdx.z << 16);
    out2[bid * nthreads + tid] = blockIdx.x | (blockIdx.y << 8) | (blockIdx.z << 16);
}

// out[i] = the mode's shuffle of in[i] within the block's warps (mode 0 up, 1 down, 2 xor, 3 idx).
extern "C" __global__ void probe_shfl(float* out, const float* in, int mode, int arg, int width) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = in[i];
    float r = 0.0f;
    if (mode == 0) r = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width);
    if (mode == 1) r = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width);
    if (mode == 2) r = __shfl_xor_sync(0xffffffffu, v, arg, width);
    if (mode == 3) r = __shfl_sync(0xffffffffu, v, arg, width);
    out[i] = r;
}

// A double through a shuffle (8 bytes) and a tree sum over the warp.
extern "C" __global__ void probe_warp_sum_d(double* out, const double* in) {
    double v = in[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

// Lanes 0..15 and 16..31 shuffle within their own half-warp masks at different lines: legal.
extern "C" __global__ void probe_half_masks(int* out) {
    const int lane = threadIdx.x % 32;
    int r;
    if (lane < 16) {
        r = __shfl_xor_sync(0x0000ffffu, lane, 1);
    } else {
        r = __shfl_xor_sync(0xffff0000u, lane, 2);
    }
    out[threadIdx.x] = r;
}

// Reverses a block's values through static and dynamic shared memory (needs the barrier).
extern "C" __global__ void probe_shared_reverse(float* out, const float* in) {
    __shared__ float st[1024];
    extern __shared__ float dyn[];
    const int t = threadIdx.x, n = blockDim.x;
    const int base = blockIdx.x * n;
    st[t] = in[base + t];
    dyn[t] = 2.0f * in[base + t];
    __syncthreads();
    out[base + t] = st[n - 1 - t] + dyn[n - 1 - t];
}

// Reads dynamic shared memory no thread wrote: the emulator's fill (0xff bytes, NaN) shows.
extern "C" __global__ void probe_shared_unwritten(float* out) {
    extern __shared__ float dyn[];
    out[threadIdx.x] = dyn[threadIdx.x];
}

// Lanes write, __syncwarp, lanes read a neighbour's value.
extern "C" __global__ void probe_syncwarp(int* out) {
    __shared__ int s[32];
    const int lane = threadIdx.x;
    s[lane] = lane * 10;
    __syncwarp();
    out[lane] = s[(lane + 1) % 32];
}

// Every thread adds 1 to acc[0] and its block index to acc[1]; ints count into iacc.
extern "C" __global__ void probe_atomics(float* acc, int* iacc, double* dacc) {
    atomicAdd(&acc[0], 1.0f);
    atomicAdd(&acc[1], (float)blockIdx.x);
    atomicAdd(&iacc[0], 1);
    atomicAdd(&dacc[0], 0.5);
}

// out[i] = bf16 bits of in[i], and back[i] = that bf16 as float.
extern "C" __global__ void probe_bf16(__nv_bfloat16* out, float* back, const float* in, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __float2bfloat16_rn(in[i]);
    back[i] = __bfloat162float(out[i]);
}

// Broken on purpose: the first half of the block waits at one __syncthreads, the rest at another.
extern "C" __global__ void probe_divergent_barrier(int* out) {
    if (threadIdx.x < blockDim.x / 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Broken on purpose: thread 0 returns, the others wait at a barrier.
extern "C" __global__ void probe_exit_before_barrier(int* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Broken on purpose: lane 31 returns before a full-mask shuffle.
extern "C" __global__ void probe_exit_before_shfl(int* out) {
    if (threadIdx.x == 31) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

// Broken on purpose: lane 0 shuffles with a mask that leaves lane 0 out.
extern "C" __global__ void probe_mask_without_self(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xfffffffeu, (int)threadIdx.x, 1);
}

// Broken on purpose: half the warp waits at __syncthreads while the other half shuffles with
// the full mask, so neither can finish.
extern "C" __global__ void probe_deadlock(int* out) {
    int r = 0;
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        r = __shfl_xor_sync(0xffffffffu, 1, 1);
    }
    out[threadIdx.x] = r;
}

// Writes one element past the end of its buffer (n elements) from the last thread.
extern "C" __global__ void probe_write_past_end(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

// 49 KiB of static shared memory: over the 48 KiB a block may have without the opt-in.
extern "C" __global__ void probe_big_static_shared(float* out) {
    __shared__ float big[12544];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

// Uses `floats` floats of dynamic shared memory (writes the first and the last).
extern "C" __global__ void probe_dynamic_shared(float* out, int floats) {
    extern __shared__ float dyn[];
    dyn[0] = 1.0f;
    dyn[floats - 1] = 2.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = dyn[0] + dyn[floats - 1];
}

// Takes one argument of each kind, so the launcher's signature check can be exercised.
extern "C" __global__ void probe_args(float* out, int i, long long l, float f) {
    if (threadIdx.x == 0) out[0] = (float)i + (float)l + f;
}
