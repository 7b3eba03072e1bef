// Causal multi-head self-attention on tensor cores, FlashAttention-2 style: bf16 operands with
// f32 accumulation through WMMA (nvcuda::wmma, m16n16k16), the head size a compile-time constant
// (instantiated for 64 and 128), key tiles past the diagonal skipped, one log-sum-exp per query
// row kept for the backward. Same contract as attention.cu's kernels (which stay as the f32
// reference and the fallback): qkv (B,T,3C) f32 with Q, K, V side by side, out (B,T,C),
// lse (B,NH,T), dqkv (B,T,3C) overwritten; Q, K, V, P, dO and dS are rounded to bf16 on their
// way into shared memory, scores, softmax statistics and every accumulator stay f32. With
// out_bf16 (dqkv_bf16) not null, each output element rounded to bf16 (nearest even) goes there
// too, from the same store: the next matmul's operand, with no cast kernel between.
//
// Work split: blocks of 4 warps (128 threads) own 64 query rows (forward, dQ) or 64 key rows
// (dK/dV), 16 per warp; the other side streams through shared memory in tiles of 64 rows.
// Forward, per key tile: S = Q·Kᵀ (warp's 16 × 64), stored to shared memory, where two lanes per
// row take the online-softmax step (running max m, sum l, P = exp(S − m) as bf16, the factor
// exp(m_old − m) that rescales the row's output), then O = O·corr + P·V in registers. dQ, per
// key tile: S and dP = dO·Vᵀ, dS = P ⊙ (dP − δ) with P = exp(S − lse), dQ += dS·K. dK/dV, per
// query tile: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q. δ = Σ_d dO·O per row comes
// from attention.cu's attention_backward_delta (f32). dQ and dK/dV are separate kernels, so
// every element has one writer and the result is bit-reproducible (no atomics).
//
// The element ↔ lane mapping of a WMMA fragment is unspecified, so the kernels never assume one:
// each warp learns its accumulator mapping once by loading a tile whose elements are their own
// positions (fa_acc_positions), and uses it for the per-row scaling of O, masks and stores.
// Rows of a query block and keys of a tile past T are zero in shared memory, masked out of the
// softmax, and never written.
//
// Shared memory per block (bytes, from the layouts below; the host passes its size, checked):
// forward 46 336 (HS 64) / 62 720 (HS 128), dQ 47 616 / 80 384, dK/dV 56 832 / 89 600. Above
// 48 KiB the host raises the kernel's limit (the sm_70+ opt-in). Needs sm_80 (bf16 WMMA); on
// older devices the kernels trap and the host keeps attention.cu's kernels.
#include <mma.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FA_SUPPORTED 0
#else
#define FA_SUPPORTED 1
#endif

#define FA_ROWS 64     // query (or key) rows per block, and rows per streamed tile
#define FA_THREADS 128 // 4 warps of 16 rows
#define FA_PAD 8       // bf16 elements past each tile row (16 bytes: rows stay 16-byte multiples, banks shift)
#define FA_LDS 68      // f32 stride of a warp's score rows (64 + 4)
#define FA_LDP 72      // bf16 stride of a warp's P / dS rows (64 + 8)

#if FA_SUPPORTED
using namespace nvcuda;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> fa_acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fa_b_col;

// Bytes of one 64-row bf16 tile of head size HS, and of the per-warp regions.
template <int HS>
__device__ constexpr int fa_tile_bytes() {
    return FA_ROWS * (HS + FA_PAD) * 2;
}
#define FA_S_BYTES (4 * 16 * FA_LDS * 4)
#define FA_P_BYTES (4 * 16 * FA_LDP * 2)
#define FA_IDX_BYTES (256 * 4)
template <int HS>
__device__ constexpr int fa_forward_smem() {
    return (fa_tile_bytes<HS>() > FA_S_BYTES ? fa_tile_bytes<HS>() : FA_S_BYTES) + 2 * fa_tile_bytes<HS>() + FA_P_BYTES + 64 * 4 + FA_IDX_BYTES;
}
template <int HS>
__device__ constexpr int fa_dq_smem() {
    return 4 * fa_tile_bytes<HS>() + FA_P_BYTES + 2 * 64 * 4 + FA_IDX_BYTES;
}
template <int HS>
__device__ constexpr int fa_dkdv_smem() {
    return 4 * fa_tile_bytes<HS>() + 2 * FA_P_BYTES + 2 * 64 * 4 + FA_IDX_BYTES;
}

// dst (64 × HS bf16, row stride HS + FA_PAD) = bf16(src rows 0..63), rows >= valid set to zero.
// src is the tile's first row at the head's first column; rows are row_stride floats apart.
template <int HS>
__device__ void fa_load_tile(__nv_bfloat16* dst, const float* src, long long row_stride, int valid) {
    for (int e = threadIdx.x; e < FA_ROWS * HS; e += FA_THREADS) {
        const int r = e / HS, d = e % HS;
        const float v = r < valid ? src[(long long)r * row_stride + d] : 0.0f;
        dst[r * (HS + FA_PAD) + d] = __float2bfloat16_rn(v);
    }
}

// The 16×16 position (r·16 + c) of each element of this lane's accumulator fragments, learnt
// from `idx`, a shared tile holding 0..255 that every thread of the block has finished writing.
__device__ void fa_acc_positions(int pos[8], const float* idx) {
    fa_acc f;
    wmma::load_matrix_sync(f, idx, 16, wmma::mem_row_major);
#pragma unroll
    for (int i = 0; i < 8; i++) pos[i] = (int)f.x[i];
}

__device__ void fa_write_positions(float* idx) {
    for (int e = threadIdx.x; e < 256; e += FA_THREADS) idx[e] = (float)e;
}

// CPU reference: backend::cpu::attention::attention_forward (which keeps att (B,NH,T,T) instead of lse).
template <int HS>
__device__ void flash_forward_impl(float* out, float* lse, const float* qkv, int T, int C, int NH, int smem_bytes, __nv_bfloat16* out_bf16) {
    constexpr int LDH = HS + FA_PAD, KT = HS / 16;
    extern __shared__ float fa_smem[];
    if (smem_bytes < fa_forward_smem<HS>()) __trap();
    char* sp = (char*)fa_smem;
    __nv_bfloat16* sQ = (__nv_bfloat16*)sp;  // Q tile until every warp holds its fragments,
    float* sS = (float*)sp;                  // then each warp's scores
    sp += fa_tile_bytes<HS>() > FA_S_BYTES ? fa_tile_bytes<HS>() : FA_S_BYTES;
    __nv_bfloat16* sK = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sV = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sP = (__nv_bfloat16*)sp;
    sp += FA_P_BYTES;
    float* sRow = (float*)sp;
    sp += 64 * 4;
    float* sIdx = (float*)sp;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Later query blocks see more keys: start them first.
    const int qb = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int q0 = qb * FA_ROWS;
    const long long rs = 3LL * C;
    const float* base = qkv + (long long)b * T * rs + (long long)h * HS;
    fa_load_tile<HS>(sQ, base + (long long)q0 * rs, rs, T - q0);
    fa_write_positions(sIdx);
    __syncthreads();
    fa_a qf[KT];
#pragma unroll
    for (int kk = 0; kk < KT; kk++) wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * LDH + kk * 16, LDH);
    int pos[8];
    fa_acc_positions(pos, sIdx);
    fa_acc of[KT];
#pragma unroll
    for (int n = 0; n < KT; n++) wmma::fill_fragment(of[n], 0.0f);

    // The softmax step: lane = row r of the warp's 16 (r and r + 8 share banks, so the four
    // lanes on one bank start at different columns), half = which 32 columns.
    const int r = lane >> 1, half = lane & 1;
    const int rot = half + 2 * (r >> 3);
    const int qrow = q0 + warp * 16 + r;
    float* sSw = sS + warp * 16 * FA_LDS;
    __nv_bfloat16* sPw = sP + warp * 16 * FA_LDP;
    float* sRw = sRow + warp * 16;
    const float scale = 1.0f / sqrtf((float)HS);
    float m = -LD_INF, l = 0.0f;

    for (int kt = 0; kt <= qb; kt++) {
        const int k0 = kt * FA_ROWS;
        // Every warp is done with the last tile's K and V (and, the first time, with sQ).
        __syncthreads();
        fa_load_tile<HS>(sK, base + C + (long long)k0 * rs, rs, T - k0);
        fa_load_tile<HS>(sV, base + 2 * C + (long long)k0 * rs, rs, T - k0);
        __syncthreads();
        // On the diagonal tile, key chunks past the warp's last row are all masked.
        const int chunks = kt == qb ? warp + 1 : 4;
#pragma unroll
        for (int n = 0; n < 4; n++) {
            if (n < chunks) {
                fa_acc s;
                wmma::fill_fragment(s, 0.0f);
#pragma unroll
                for (int kk = 0; kk < KT; kk++) {
                    fa_b_col kf;
                    wmma::load_matrix_sync(kf, sK + n * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(s, qf[kk], kf, s);
                }
                wmma::store_matrix_sync(sSw + n * 16, s, FA_LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();
        float sv[32];
        float mt = -LD_INF;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int col = half * 32 + ((c + rot) & 31);
            const int key = k0 + col;
            sv[c] = (key <= qrow && key < T) ? sSw[r * FA_LDS + col] * scale : -LD_INF;
            mt = fmaxf(mt, sv[c]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(LD_FULL_MASK, mt, 1));
        // Key 0 is in every row's first tile, so m is finite from the first tile on.
        const float m_new = fmaxf(m, mt);
        const float corr = m == -LD_INF ? 0.0f : expf(m - m_new);
        float lt = 0.0f;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int col = half * 32 + ((c + rot) & 31);
            const float p = expf(sv[c] - m_new);
            lt += p;
            sPw[r * FA_LDP + col] = __float2bfloat16_rn(p);
        }
        lt += __shfl_xor_sync(LD_FULL_MASK, lt, 1);
        l = l * corr + lt;
        m = m_new;
        if (half == 0) sRw[r] = corr;
        __syncwarp();
        float cr[8];
#pragma unroll
        for (int i = 0; i < 8; i++) cr[i] = sRw[pos[i] >> 4];
#pragma unroll
        for (int n = 0; n < KT; n++)
#pragma unroll
            for (int i = 0; i < 8; i++) of[n].x[i] *= cr[i];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            if (kk < chunks) {
                fa_a pf;
                wmma::load_matrix_sync(pf, sPw + kk * 16, FA_LDP);
#pragma unroll
                for (int n = 0; n < KT; n++) {
                    fa_b_row vf;
                    wmma::load_matrix_sync(vf, sV + kk * 16 * LDH + n * 16, LDH);
                    wmma::mma_sync(of[n], pf, vf, of[n]);
                }
            }
        }
    }
    __syncwarp();
    if (half == 0) {
        sRw[r] = 1.0f / l;
        if (qrow < T) lse[(long long)bh * T + qrow] = m + logf(l);
    }
    __syncwarp();
    float inv[8];
#pragma unroll
    for (int i = 0; i < 8; i++) inv[i] = sRw[pos[i] >> 4];
    const long long ooff = (long long)b * T * C + (long long)h * HS;
#pragma unroll
    for (int n = 0; n < KT; n++)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int row = q0 + warp * 16 + (pos[i] >> 4);
            if (row < T) {
                const long long e = ooff + (long long)row * C + n * 16 + (pos[i] & 15);
                const float o = of[n].x[i] * inv[i];
                out[e] = o;
                if (out_bf16) out_bf16[e] = __float2bfloat16_rn(o);
            }
        }
}

// dQ of 64 query rows: dq_i = scale·Σ_{j<=i} p_ij·(dout_i·v_j − delta_i)·k_j.
// CPU reference: backend::cpu::attention::attention_backward (the dQ = dpre·K product).
template <int HS>
__device__ void flash_backward_dq_impl(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH,
                                       int smem_bytes, __nv_bfloat16* dqkv_bf16) {
    constexpr int LDH = HS + FA_PAD, KT = HS / 16;
    extern __shared__ float fa_smem[];
    if (smem_bytes < fa_dq_smem<HS>()) __trap();
    char* sp = (char*)fa_smem;
    __nv_bfloat16* sQ = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sG = (__nv_bfloat16*)sp;  // dO
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sK = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sV = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sDS = (__nv_bfloat16*)sp;
    sp += FA_P_BYTES;
    float* sL = (float*)sp;
    sp += 64 * 4;
    float* sD = (float*)sp;
    sp += 64 * 4;
    float* sIdx = (float*)sp;

    const int warp = threadIdx.x / 32;
    const int qb = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int q0 = qb * FA_ROWS;
    const long long rs = 3LL * C;
    const float* base = qkv + (long long)b * T * rs + (long long)h * HS;
    fa_load_tile<HS>(sQ, base + (long long)q0 * rs, rs, T - q0);
    fa_load_tile<HS>(sG, dout + ((long long)b * T + q0) * C + (long long)h * HS, C, T - q0);
    for (int e = threadIdx.x; e < FA_ROWS; e += FA_THREADS) {
        const int q = q0 + e;
        sL[e] = q < T ? lse[(long long)bh * T + q] : 0.0f;
        sD[e] = q < T ? delta[(long long)bh * T + q] : 0.0f;
    }
    fa_write_positions(sIdx);
    __syncthreads();
    fa_a qf[KT], gf[KT];
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * LDH + kk * 16, LDH);
        wmma::load_matrix_sync(gf[kk], sG + warp * 16 * LDH + kk * 16, LDH);
    }
    int pos[8];
    fa_acc_positions(pos, sIdx);
    // This lane's rows are the same in every fragment: their lse and delta, once.
    float lr[8], dr[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        lr[i] = sL[warp * 16 + (pos[i] >> 4)];
        dr[i] = sD[warp * 16 + (pos[i] >> 4)];
    }
    fa_acc dq[KT];
#pragma unroll
    for (int n = 0; n < KT; n++) wmma::fill_fragment(dq[n], 0.0f);
    __nv_bfloat16* sDSw = sDS + warp * 16 * FA_LDP;
    const float scale = 1.0f / sqrtf((float)HS);

    for (int kt = 0; kt <= qb; kt++) {
        const int k0 = kt * FA_ROWS;
        __syncthreads();
        fa_load_tile<HS>(sK, base + C + (long long)k0 * rs, rs, T - k0);
        fa_load_tile<HS>(sV, base + 2 * C + (long long)k0 * rs, rs, T - k0);
        __syncthreads();
        const int chunks = kt == qb ? warp + 1 : 4;
#pragma unroll
        for (int n = 0; n < 4; n++) {
            if (n < chunks) {
                fa_acc s, dp;
                wmma::fill_fragment(s, 0.0f);
                wmma::fill_fragment(dp, 0.0f);
#pragma unroll
                for (int kk = 0; kk < KT; kk++) {
                    fa_b_col kf, vf;
                    wmma::load_matrix_sync(kf, sK + n * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(s, qf[kk], kf, s);
                    wmma::load_matrix_sync(vf, sV + n * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(dp, gf[kk], vf, dp);
                }
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int rr = pos[i] >> 4, cc = pos[i] & 15;
                    const int q = q0 + warp * 16 + rr, key = k0 + n * 16 + cc;
                    const float p = (key <= q && q < T) ? expf(s.x[i] * scale - lr[i]) : 0.0f;
                    sDSw[rr * FA_LDP + n * 16 + cc] = __float2bfloat16_rn(p * (dp.x[i] - dr[i]));
                }
            }
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            if (kk < chunks) {
                fa_a dsf;
                wmma::load_matrix_sync(dsf, sDSw + kk * 16, FA_LDP);
#pragma unroll
                for (int n = 0; n < KT; n++) {
                    fa_b_row kf;
                    wmma::load_matrix_sync(kf, sK + kk * 16 * LDH + n * 16, LDH);
                    wmma::mma_sync(dq[n], dsf, kf, dq[n]);
                }
            }
        }
    }
    const long long qoff = (long long)b * T * rs + (long long)h * HS;
#pragma unroll
    for (int n = 0; n < KT; n++)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int row = q0 + warp * 16 + (pos[i] >> 4);
            if (row < T) {
                const long long e = qoff + (long long)row * rs + n * 16 + (pos[i] & 15);
                const float g = dq[n].x[i] * scale;
                dqkv[e] = g;
                if (dqkv_bf16) dqkv_bf16[e] = __float2bfloat16_rn(g);
            }
        }
}

// dK and dV of 64 key rows: dv_j = Σ_{i>=j} p_ij·dout_i, dk_j = scale·Σ_{i>=j} p_ij·(dout_i·v_j − delta_i)·q_i.
// CPU reference: backend::cpu::attention::attention_backward (dV = attᵀ·dout, dK = dpreᵀ·Q).
template <int HS>
__device__ void flash_backward_dkdv_impl(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta, int T, int C, int NH,
                                         int smem_bytes, __nv_bfloat16* dqkv_bf16) {
    constexpr int LDH = HS + FA_PAD, KT = HS / 16;
    // At HS 64 the warp's K and V fragments stay in registers; at 128 (with 2·8 accumulators
    // for dK and dV) they are reloaded from shared memory, which keeps the kernel from spilling.
    constexpr bool KEEP_KV = HS <= 64;
    extern __shared__ float fa_smem[];
    if (smem_bytes < fa_dkdv_smem<HS>()) __trap();
    char* sp = (char*)fa_smem;
    __nv_bfloat16* sK = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sV = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sQ = (__nv_bfloat16*)sp;
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sG = (__nv_bfloat16*)sp;  // dO
    sp += fa_tile_bytes<HS>();
    __nv_bfloat16* sPt = (__nv_bfloat16*)sp;
    sp += FA_P_BYTES;
    __nv_bfloat16* sDSt = (__nv_bfloat16*)sp;
    sp += FA_P_BYTES;
    float* sL = (float*)sp;
    sp += 64 * 4;
    float* sD = (float*)sp;
    sp += 64 * 4;
    float* sIdx = (float*)sp;

    const int warp = threadIdx.x / 32;
    // Earlier key blocks are seen by more queries: blockIdx order already starts them first.
    const int kb = blockIdx.x;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int k0 = kb * FA_ROWS;
    const long long rs = 3LL * C;
    const float* base = qkv + (long long)b * T * rs + (long long)h * HS;
    const float* gbase = dout + (long long)b * T * C + (long long)h * HS;
    fa_load_tile<HS>(sK, base + C + (long long)k0 * rs, rs, T - k0);
    fa_load_tile<HS>(sV, base + 2 * C + (long long)k0 * rs, rs, T - k0);
    fa_write_positions(sIdx);
    __syncthreads();
    int pos[8];
    fa_acc_positions(pos, sIdx);
    fa_a kf[KEEP_KV ? KT : 1], vf[KEEP_KV ? KT : 1];
    if constexpr (KEEP_KV) {
#pragma unroll
        for (int kk = 0; kk < KT; kk++) {
            wmma::load_matrix_sync(kf[kk], sK + warp * 16 * LDH + kk * 16, LDH);
            wmma::load_matrix_sync(vf[kk], sV + warp * 16 * LDH + kk * 16, LDH);
        }
    }
    fa_acc dk[KT], dv[KT];
#pragma unroll
    for (int n = 0; n < KT; n++) {
        wmma::fill_fragment(dk[n], 0.0f);
        wmma::fill_fragment(dv[n], 0.0f);
    }
    __nv_bfloat16* sPtw = sPt + warp * 16 * FA_LDP;
    __nv_bfloat16* sDStw = sDSt + warp * 16 * FA_LDP;
    const float scale = 1.0f / sqrtf((float)HS);
    const int tiles = (T + FA_ROWS - 1) / FA_ROWS;

    for (int qt = kb; qt < tiles; qt++) {
        const int q0 = qt * FA_ROWS;
        __syncthreads();
        fa_load_tile<HS>(sQ, base + (long long)q0 * rs, rs, T - q0);
        fa_load_tile<HS>(sG, gbase + (long long)q0 * C, C, T - q0);
        for (int e = threadIdx.x; e < FA_ROWS; e += FA_THREADS) {
            const int q = q0 + e;
            sL[e] = q < T ? lse[(long long)bh * T + q] : 0.0f;
            sD[e] = q < T ? delta[(long long)bh * T + q] : 0.0f;
        }
        __syncthreads();
        // On the diagonal tile, query chunks before the warp's first key see none of its keys.
        const int first = qt == kb ? warp : 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (j >= first) {
                fa_acc st, dpt;
                wmma::fill_fragment(st, 0.0f);
                wmma::fill_fragment(dpt, 0.0f);
#pragma unroll
                for (int kk = 0; kk < KT; kk++) {
                    fa_b_col qf, gf;
                    wmma::load_matrix_sync(qf, sQ + j * 16 * LDH + kk * 16, LDH);
                    wmma::load_matrix_sync(gf, sG + j * 16 * LDH + kk * 16, LDH);
                    if constexpr (KEEP_KV) {
                        wmma::mma_sync(st, kf[kk], qf, st);
                        wmma::mma_sync(dpt, vf[kk], gf, dpt);
                    } else {
                        fa_a kr, vr;
                        wmma::load_matrix_sync(kr, sK + warp * 16 * LDH + kk * 16, LDH);
                        wmma::mma_sync(st, kr, qf, st);
                        wmma::load_matrix_sync(vr, sV + warp * 16 * LDH + kk * 16, LDH);
                        wmma::mma_sync(dpt, vr, gf, dpt);
                    }
                }
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int rr = pos[i] >> 4, ql = j * 16 + (pos[i] & 15);
                    const int key = k0 + warp * 16 + rr, q = q0 + ql;
                    const float p = (key <= q && q < T) ? expf(st.x[i] * scale - sL[ql]) : 0.0f;
                    sPtw[rr * FA_LDP + ql] = __float2bfloat16_rn(p);
                    sDStw[rr * FA_LDP + ql] = __float2bfloat16_rn(p * (dpt.x[i] - sD[ql]));
                }
            }
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            if (kk >= first) {
                fa_a pf, dsf;
                wmma::load_matrix_sync(pf, sPtw + kk * 16, FA_LDP);
                wmma::load_matrix_sync(dsf, sDStw + kk * 16, FA_LDP);
#pragma unroll
                for (int n = 0; n < KT; n++) {
                    fa_b_row gf, qf;
                    wmma::load_matrix_sync(gf, sG + kk * 16 * LDH + n * 16, LDH);
                    wmma::mma_sync(dv[n], pf, gf, dv[n]);
                    wmma::load_matrix_sync(qf, sQ + kk * 16 * LDH + n * 16, LDH);
                    wmma::mma_sync(dk[n], dsf, qf, dk[n]);
                }
            }
        }
    }
    const long long koff = (long long)b * T * rs + (long long)h * HS;
#pragma unroll
    for (int n = 0; n < KT; n++)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int row = k0 + warp * 16 + (pos[i] >> 4);
            const int col = n * 16 + (pos[i] & 15);
            if (row < T) {
                const long long e = koff + (long long)row * rs + col;
                const float gk = dk[n].x[i] * scale, gv = dv[n].x[i];
                dqkv[e + C] = gk;
                dqkv[e + 2 * C] = gv;
                if (dqkv_bf16) {
                    dqkv_bf16[e + C] = __float2bfloat16_rn(gk);
                    dqkv_bf16[e + 2 * C] = __float2bfloat16_rn(gv);
                }
            }
        }
}
#define FA_CALL(f) f
#else
#define FA_CALL(f) __trap()
#endif  // FA_SUPPORTED

// Grid (ceil(T/64), B·NH), block 128, dynamic shared memory smem_bytes (see the top). Two blocks
// per SM for ptxas (up to 255 registers each): with the default target it spills at HS 64.
#define FA_INSTANTIATE(HS)                                                                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2)                                                                        \
        flash_attention_forward_hs##HS(float* out, float* lse, const float* qkv, int T, int C, int NH, int smem_bytes,                \
                                       __nv_bfloat16* out_bf16) {                                                                    \
        FA_CALL((flash_forward_impl<HS>(out, lse, qkv, T, C, NH, smem_bytes, out_bf16)));                                            \
    }                                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2)                                                                        \
        flash_attention_backward_dq_hs##HS(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta,     \
                                           int T, int C, int NH, int smem_bytes, __nv_bfloat16* dqkv_bf16) {                         \
        FA_CALL((flash_backward_dq_impl<HS>(dqkv, dout, qkv, lse, delta, T, C, NH, smem_bytes, dqkv_bf16)));                         \
    }                                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2)                                                                        \
        flash_attention_backward_dkdv_hs##HS(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* delta,   \
                                             int T, int C, int NH, int smem_bytes, __nv_bfloat16* dqkv_bf16) {                       \
        FA_CALL((flash_backward_dkdv_impl<HS>(dqkv, dout, qkv, lse, delta, T, C, NH, smem_bytes, dqkv_bf16)));                       \
    }

FA_INSTANTIATE(64)
FA_INSTANTIATE(128)
