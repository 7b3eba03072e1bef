// Probe kernels of the emulated warp matrix functions (emu/include/mma.h), compiled only for the
// emulated device and driven by worker/tests/cuda_emu_wmma.rs: one tile product in every layout,
// a tiled gemm accumulating in place, the element mapping, and kernels that break the rules.
#include <mma.h>

using namespace nvcuda;

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_t;

template <typename LA, typename LB>
__device__ void probe_mma_tile(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c, int c_col, int d_col, int lda, int ldb, int ldc, int ldd) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LB> fb;
    acc_t fc;
    wmma::load_matrix_sync(fa, a, lda);
    wmma::load_matrix_sync(fb, b, ldb);
    wmma::load_matrix_sync(fc, c, ldc, c_col ? wmma::mem_col_major : wmma::mem_row_major);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(d, fc, ldd, d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

// d = a·b + c for one 16×16×16 tile, each operand in the layout and leading dimension given
// (a_col: a is stored column major, and so on). One warp.
extern "C" __global__ void probe_wmma_mma(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c, int a_col, int b_col, int c_col,
                                          int d_col, int lda, int ldb, int ldc, int ldd) {
    if (a_col && b_col) probe_mma_tile<wmma::col_major, wmma::col_major>(d, a, b, c, c_col, d_col, lda, ldb, ldc, ldd);
    if (a_col && !b_col) probe_mma_tile<wmma::col_major, wmma::row_major>(d, a, b, c, c_col, d_col, lda, ldb, ldc, ldd);
    if (!a_col && b_col) probe_mma_tile<wmma::row_major, wmma::col_major>(d, a, b, c, c_col, d_col, lda, ldb, ldc, ldd);
    if (!a_col && !b_col) probe_mma_tile<wmma::row_major, wmma::row_major>(d, a, b, c, c_col, d_col, lda, ldb, ldc, ldd);
}

// d (M,N) = a (M,K) · b (K,N), all row major, M, N, K multiples of 16: two warps per block, one
// 16×16 output tile per warp, accumulated in place over K (mma_sync(acc, a, b, acc)).
extern "C" __global__ void probe_wmma_gemm(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, int M, int N, int K) {
    const int tile = blockIdx.x * 2 + threadIdx.x / 32;
    const int tm = tile / (N / 16), tn = tile % (N / 16);
    if (tm >= M / 16) return;  // the whole warp leaves together
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
    acc_t acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::load_matrix_sync(fa, a + (long long)tm * 16 * K + k0, K);
        wmma::load_matrix_sync(fb, b + (long long)k0 * N + tn * 16, N);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(d + (long long)tm * 16 * N + tn * 16, acc, N, wmma::mem_row_major);
}

// out[k·256 + lane·8 + i] = the tile element (r·16 + c) that element i of `lane` holds, for the
// accumulator (k = 0), matrix_a (1) and matrix_b (2), learnt by loading a tile of those values.
extern "C" __global__ void probe_wmma_mapping(int* out) {
    __shared__ float tf[256];
    __shared__ __nv_bfloat16 tb[256];
    const int lane = threadIdx.x;
    for (int e = lane; e < 256; e += 32) {
        tf[e] = (float)e;
        tb[e] = __float2bfloat16_rn((float)e);  // integers up to 256 are exact in bf16
    }
    __syncwarp();
    acc_t acc;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
    wmma::load_matrix_sync(acc, tf, 16, wmma::mem_row_major);
    wmma::load_matrix_sync(fa, tb, 16);
    wmma::load_matrix_sync(fb, tb, 16);
    for (int i = 0; i < acc.num_elements; i++) out[lane * 8 + i] = (int)acc.x[i];
    for (int i = 0; i < fa.num_elements; i++) out[256 + lane * 8 + i] = (int)__bfloat162float(fa.x[i]);
    for (int i = 0; i < fb.num_elements; i++) out[512 + lane * 8 + i] = (int)__bfloat162float(fb.x[i]);
}

// Stores a tile of ones to shared memory, then each lane reads an element other lanes stored:
// with `sync` after a __syncwarp, without it straight away (a race the emulation exposes).
extern "C" __global__ void probe_wmma_store_then_read(float* out, int sync) {
    __shared__ float t[256];
    acc_t acc;
    wmma::fill_fragment(acc, 1.0f);
    wmma::store_matrix_sync(t, acc, 16, wmma::mem_row_major);
    if (sync) __syncwarp();
    out[threadIdx.x] = t[(threadIdx.x * 8 + 131) % 256];
}

// ---- kernels that break the rules (each must be refused) ------------------------------------

// mptr 4 bytes past a 32-byte boundary.
extern "C" __global__ void probe_wmma_misaligned(float* buf) {
    acc_t acc;
    wmma::load_matrix_sync(acc, buf + 1, 16, wmma::mem_row_major);
    wmma::store_matrix_sync(buf, acc, 16, wmma::mem_row_major);
}

// ldm of 12 bf16 (24 bytes) for a matrix_a load.
extern "C" __global__ void probe_wmma_bad_ldm(float* buf) {
    __shared__ __nv_bfloat16 t[256];
    for (int e = threadIdx.x; e < 256; e += 32) t[e] = __float2bfloat16_rn(1.0f);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, t, 12);
    buf[threadIdx.x] = __bfloat162float(fa.x[0]);
}

// Half the warp loads, the other half does not (a divergent warp-collective call).
extern "C" __global__ void probe_wmma_divergent(float* buf) {
    acc_t acc;
    wmma::fill_fragment(acc, 0.0f);
    if (threadIdx.x < 16) wmma::load_matrix_sync(acc, buf, 16, wmma::mem_row_major);
    buf[threadIdx.x] = acc.x[0];
}

// Each lane passes its own pointer.
extern "C" __global__ void probe_wmma_lane_pointers(float* buf) {
    acc_t acc;
    wmma::load_matrix_sync(acc, buf + 8 * (threadIdx.x % 2), 16, wmma::mem_row_major);
    buf[threadIdx.x] = acc.x[0];
}
