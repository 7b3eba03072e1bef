// The CUDA emulation header: what the kernels in kernels/*.cu may use when worker/build.rs
// compiles them for the CPU with the host C++ compiler. Every name here has the semantics the
// CUDA Programming Guide (and the PTX ISA for the warp shuffles) gives it; anything a kernel
// uses that is not declared here fails the build, and the build script names it.
//
// How a kernel runs (the runtime is worker/src/backend/cuda/emu/runtime.rs):
// - Each GPU thread is a fiber (its own stack and program counter) of one block; the block's
//   fibers run on one OS thread, each until it reaches __syncthreads, a warp shuffle or
//   __syncwarp, or returns. Blocks are spread over a small persistent pool of OS threads.
// - __syncthreads, __syncwarp and __shfl_*_sync are calls into the runtime, which suspends the
//   fiber until every thread the barrier names has arrived, and refuses (with the file and line)
//   a barrier that a thread of the block has exited before, threads waiting at different
//   barriers, a shuffle with a lane missing from its mask, and a block that can make no progress.
// - Shared memory: worker/build.rs rewrites each `__shared__ T name[N];` into a reference to
//   per-block storage from ld_emu_static_shared, and each `extern __shared__ T name[];` into a
//   pointer to the launch's dynamic shared memory. Both start every block filled with 0xff bytes
//   (NaN as float or double, -1 as int), as garbage would, so a read before a write shows.
//
// The compile has no standard headers (-nostdinc, as NVRTC has none): the math functions below
// are declared here and come from the C library (glibc's libm, not CUDA's libdevice; both are
// within about 1 ulp of exact, so their results can differ in the last bit).
#pragma once

#ifdef LD_EMU_SCAN
// The build script's scan pass: kernels are found by this marker in the preprocessed source.
#define __global__ __ld_emu_kernel__
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

// ---- thread and block indices ---------------------------------------------------------------

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

// Everything a GPU thread can ask about itself; laid out as runtime.rs's ThreadCtx.
struct ld_emu_thread_ctx {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

// The running fiber's context, set by the runtime before it resumes a fiber (emu/support.cc).
extern __thread const ld_emu_thread_ctx* ld_emu_self;

#define threadIdx (ld_emu_self->thread_idx)
#define blockIdx (ld_emu_self->block_idx)
#define blockDim (ld_emu_self->block_dim)
#define gridDim (ld_emu_self->grid_dim)
#define warpSize 32

// ---- the runtime's entry points (worker/src/backend/cuda/emu/runtime.rs) ----------------------

extern "C" {
void ld_emu_syncthreads(const char* file, int line);
void ld_emu_syncwarp(unsigned int mask, const char* file, int line);
// One warp shuffle: `bits` is this lane's value, the result the source lane's (PTX shfl.sync).
unsigned long long ld_emu_shfl(unsigned long long bits, int mode, unsigned int b, unsigned int c, unsigned int mask,
                               const char* file, int line);
void* ld_emu_dynamic_shared(void);
void* ld_emu_static_shared(const void* site, unsigned long bytes, unsigned long align, const char* file, int line);
void ld_emu_trap(const char* what, const char* file, int line);
}

// Source-location defaults, so the runtime names the kernel line that reached a barrier.
#define LD_EMU_HERE const char *ld_file = __builtin_FILE(), int ld_line = __builtin_LINE()

static __forceinline__ void __syncthreads(LD_EMU_HERE) { ld_emu_syncthreads(ld_file, ld_line); }
static __forceinline__ void __syncwarp(unsigned int mask = 0xffffffffu, LD_EMU_HERE) { ld_emu_syncwarp(mask, ld_file, ld_line); }
static __forceinline__ void __trap(LD_EMU_HERE) { ld_emu_trap("__trap()", ld_file, ld_line); }

// ---- warp shuffles (PTX shfl.sync: mode, b = lane or offset, c = clamp and segment mask) ----

#define LD_EMU_SHFL_UP 0
#define LD_EMU_SHFL_DOWN 1
#define LD_EMU_SHFL_BFLY 2
#define LD_EMU_SHFL_IDX 3

template <typename T>
static __forceinline__ T ld_emu_shfl_t(unsigned int mask, T var, int mode, int b, unsigned int c, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    __builtin_memcpy(&bits, &var, sizeof(T));
    bits = ld_emu_shfl(bits, mode, (unsigned int)b, c, mask, file, line);
    T out;
    __builtin_memcpy(&out, &bits, sizeof(T));
    return out;
}

// CUDA's encoding of `width` into shfl.sync's c operand: segment mask in bits 8..12, clamp in 0..4.
#define LD_EMU_SHFL_C(width, clamp) ((((unsigned int)(32 - (width))) << 8) | (clamp))

template <typename T>
static __forceinline__ T __shfl_sync(unsigned int mask, T var, int srcLane, int width = warpSize, LD_EMU_HERE) {
    return ld_emu_shfl_t(mask, var, LD_EMU_SHFL_IDX, srcLane, LD_EMU_SHFL_C(width, 0x1f), ld_file, ld_line);
}
template <typename T>
static __forceinline__ T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize, LD_EMU_HERE) {
    return ld_emu_shfl_t(mask, var, LD_EMU_SHFL_UP, (int)delta, LD_EMU_SHFL_C(width, 0), ld_file, ld_line);
}
template <typename T>
static __forceinline__ T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize, LD_EMU_HERE) {
    return ld_emu_shfl_t(mask, var, LD_EMU_SHFL_DOWN, (int)delta, LD_EMU_SHFL_C(width, 0x1f), ld_file, ld_line);
}
template <typename T>
static __forceinline__ T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = warpSize, LD_EMU_HERE) {
    return ld_emu_shfl_t(mask, var, LD_EMU_SHFL_BFLY, laneMask, LD_EMU_SHFL_C(width, 0x1f), ld_file, ld_line);
}

// ---- atomics (blocks run in parallel on OS threads: real atomic read-modify-write) ----------

static __forceinline__ int atomicAdd(int* address, int val) { return __atomic_fetch_add(address, val, __ATOMIC_RELAXED); }
static __forceinline__ unsigned int atomicAdd(unsigned int* address, unsigned int val) {
    return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}
static __forceinline__ unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
    return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}
// Floating-point adds as a compare-and-swap loop on the bits: one rounding per add, as on the GPU.
static __forceinline__ float atomicAdd(float* address, float val) {
    unsigned int* p = (unsigned int*)address;
    unsigned int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        float f;
        __builtin_memcpy(&f, &old, 4);
        f += val;
        unsigned int next;
        __builtin_memcpy(&next, &f, 4);
        if (__atomic_compare_exchange_n(p, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            __builtin_memcpy(&f, &old, 4);
            return f;
        }
    }
}
static __forceinline__ double atomicAdd(double* address, double val) {
    unsigned long long* p = (unsigned long long*)address;
    unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        double f;
        __builtin_memcpy(&f, &old, 8);
        f += val;
        unsigned long long next;
        __builtin_memcpy(&next, &f, 8);
        if (__atomic_compare_exchange_n(p, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            __builtin_memcpy(&f, &old, 8);
            return f;
        }
    }
}

// ---- math (the C library's; see the note at the top) -----------------------------------------

extern "C" {
float expf(float) noexcept;
float logf(float) noexcept;
float tanhf(float) noexcept;
float sqrtf(float) noexcept;
float fabsf(float) noexcept;
float fmaxf(float, float) noexcept;
float fminf(float, float) noexcept;
double exp(double) noexcept;
double log(double) noexcept;
double sqrt(double) noexcept;
double fabs(double) noexcept;
}
// CUDA's C++ float overloads, so sqrt(float) is sqrtf as on the device, not a double sqrt.
static __forceinline__ float exp(float x) { return expf(x); }
static __forceinline__ float log(float x) { return logf(x); }
static __forceinline__ float sqrt(float x) { return sqrtf(x); }
static __forceinline__ float fabs(float x) { return fabsf(x); }

static __forceinline__ int min(int a, int b) { return a < b ? a : b; }
static __forceinline__ int max(int a, int b) { return a > b ? a : b; }
static __forceinline__ unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static __forceinline__ unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static __forceinline__ long long min(long long a, long long b) { return a < b ? a : b; }
static __forceinline__ long long max(long long a, long long b) { return a > b ? a : b; }
static __forceinline__ float min(float a, float b) { return fminf(a, b); }
static __forceinline__ float max(float a, float b) { return fmaxf(a, b); }

static __forceinline__ float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
static __forceinline__ int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
static __forceinline__ float __uint_as_float(unsigned int x) { return __builtin_bit_cast(float, x); }
static __forceinline__ unsigned int __float_as_uint(float x) { return __builtin_bit_cast(unsigned int, x); }

// ---- bf16 (cuda_bf16.h's names; the include below resolves to emu/include/cuda_bf16.h) -------

struct __nv_bfloat16 {
    unsigned short __x;
};
typedef __nv_bfloat16 nv_bfloat16;

// f32 -> bf16, round to nearest even (cvt.rn.bf16.f32): NaN becomes the canonical 0x7fff, a
// value past the largest bf16 rounds to infinity, subnormals round like any other value.
static __forceinline__ __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned int u = __builtin_bit_cast(unsigned int, f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.__x = 0x7fff;
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.__x = (unsigned short)(u >> 16);
    return r;
}
static __forceinline__ __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static __forceinline__ float __bfloat162float(__nv_bfloat16 h) { return __builtin_bit_cast(float, (unsigned int)h.__x << 16); }

// ---- how the launcher calls a kernel (worker/build.rs appends a table of these per file) -----

struct ld_emu_kernel {
    const char* name;
    void (*thunk)(void* const* args);
    // One code per parameter, as backend::cuda::device::Arg::code: p pointer, i int, l long long, f float.
    const char* signature;
};

template <typename T>
struct ld_emu_code {
    static_assert(sizeof(T) == 0, "kernel parameter type with no launcher argument kind (pointer, int, long long, float)");
};
template <typename T>
struct ld_emu_code<T*> {
    static constexpr char value = 'p';
};
template <>
struct ld_emu_code<int> {
    static constexpr char value = 'i';
};
template <>
struct ld_emu_code<long long> {
    static constexpr char value = 'l';
};
template <>
struct ld_emu_code<float> {
    static constexpr char value = 'f';
};
template <typename... A>
struct ld_emu_sig {
    static constexpr char value[] = {ld_emu_code<A>::value..., '\0'};
};
template <typename... A>
constexpr const char* ld_emu_signature(void (*)(A...)) {
    return ld_emu_sig<A...>::value;
}

template <unsigned long... I>
struct ld_emu_seq {};
template <unsigned long N, unsigned long... I>
struct ld_emu_make_seq : ld_emu_make_seq<N - 1, N - 1, I...> {};
template <unsigned long... I>
struct ld_emu_make_seq<0, I...> {
    typedef ld_emu_seq<I...> type;
};
// args[i] points at the i-th argument's value, stored as the parameter's own type.
template <typename... A, unsigned long... I>
static __forceinline__ void ld_emu_invoke(void (*f)(A...), void* const* args, ld_emu_seq<I...>) {
    f(*static_cast<A*>(args[I])...);
}
template <typename... A>
static __forceinline__ void ld_emu_call(void (*f)(A...), void* const* args) {
    ld_emu_invoke(f, args, typename ld_emu_make_seq<sizeof...(A)>::type{});
}
template <auto F>
void ld_emu_thunk(void* const* args) {
    ld_emu_call(F, args);
}
