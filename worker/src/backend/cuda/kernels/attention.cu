// Causal multi-head self-attention, fused flash-style: the (T,T) score matrix is never stored.
// The forward keeps one log-sum-exp per query row, lse (B,NH,T); the backward recomputes the
// probabilities from it tile by tile.
//
// Shapes: qkv (B,T,(NH + 2·NKV)·hs) with the NH query heads, then NKV key heads, then NKV value
// heads side by side; out (B,T,NH·hs). Query head h reads key/value head h / (NH/NKV). GPT-2 is
// the case NKV = NH, where the row is (B,T,3C) with Q, K, V each C = NH·hs wide: the
// attention_* kernels take (C, NH) and run the same code with NKV = NH; the gqa_attention_*
// kernels (Llama, Qwen2: grouped-query attention, NKV < NH) take (NH, NKV, hs).
//
// Work split: one thread per query row (forward, dq) or key row (dk, dv), keys or queries
// streamed through shared memory in tiles of ATT_TILE rows. Per-thread vectors of length hs live
// in registers, so each kernel is instantiated for hs <= 32, 64 and 128 (the host picks the
// smallest that fits). This is the online-softmax algorithm of FlashAttention without tensor
// cores: correct and memory-lean, not the fastest kernel possible. The dK/dV kernel runs one
// block row per (b, key/value head) and walks the query heads of its group in order, so the
// key and value gradients the heads share are summed in registers in a fixed order (no atomics).

#define ATT_TILE 32

// Where a query head's key and value heads are. In a row of (NH + 2·NKV)·hs floats, key head
// g starts at column C + g·hs and value head g at C + NKV·hs + g·hs (C = NH·hs): relative to
// column g·hs, the keys are C further and the values `voff` (2C for GPT-2). The GPT-2 kernels
// (GQA = false) fix NKV = NH and g = h when they are compiled, so they pay nothing for the
// grouping: their registers and spills on sm_90 are those of a plain multi-head kernel.
#define ATT_ROW_STRIDE(GQA, C, NKV, hs) ((GQA) ? (long long)(C) + 2LL * (NKV) * (hs) : 3LL * (C))
#define ATT_VOFF(GQA, C, NKV, hs) ((GQA) ? (C) + (NKV) * (hs) : 2 * (C))

// Online-softmax forward for one query row per thread.
// CPU reference: backend::cpu::attention::attention_forward (which keeps att (B,NH,T,T) instead of lse).
// CPU reference: backend::cpu::gqa_attention::gqa_forward (likewise).
template <int MAXHS, bool GQA>
__device__ void attention_forward_impl(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, int NKV) {
    extern __shared__ float smem[];
    const int hs = C / NH;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const long long rs = ATT_ROW_STRIDE(GQA, C, NKV, hs);
    const int voff = ATT_VOFF(GQA, C, NKV, hs);
    const float* base = qkv + (long long)b * T * rs + (long long)h * hs;
    const float* kvbase = GQA ? qkv + (long long)b * T * rs + (long long)(h / (NH / NKV)) * hs : base;
    float* ks = smem;
    float* vs = smem + ATT_TILE * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    float q[MAXHS], o[MAXHS];
#pragma unroll
    for (int d = 0; d < MAXHS; d++) {
        q[d] = (i < T && d < hs) ? base[(long long)i * rs + d] * scale : 0.0f;
        o[d] = 0.0f;
    }
    float m = -LD_INF, l = 0.0f;
    const int last_query = min(T - 1, (int)((blockIdx.x + 1) * blockDim.x) - 1);
    for (int j0 = 0; j0 <= last_query; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * hs; e += blockDim.x) {
            const int j = j0 + e / hs, d = e % hs;
            ks[e] = j < T ? kvbase[(long long)j * rs + C + d] : 0.0f;
            vs[e] = j < T ? kvbase[(long long)j * rs + voff + d] : 0.0f;
        }
        __syncthreads();
        if (i >= T) continue;
        const int jend = min(ATT_TILE, i - j0 + 1);
        for (int jj = 0; jj < jend; jj++) {
            float s = 0.0f;
#pragma unroll
            for (int d = 0; d < MAXHS; d++)
                if (d < hs) s += q[d] * ks[jj * hs + d];
            if (s > m) {
                const float corr = expf(m - s);
                l *= corr;
#pragma unroll
                for (int d = 0; d < MAXHS; d++) o[d] *= corr;
                m = s;
            }
            const float p = expf(s - m);
            l += p;
#pragma unroll
            for (int d = 0; d < MAXHS; d++)
                if (d < hs) o[d] += p * vs[jj * hs + d];
        }
    }
    if (i >= T) return;
    const float inv = 1.0f / l;
    float* orow = out + ((long long)b * T + i) * C + (long long)h * hs;
#pragma unroll
    for (int d = 0; d < MAXHS; d++)
        if (d < hs) orow[d] = o[d] * inv;
    lse[(long long)bh * T + i] = m + logf(l);
}

// CPU reference: backend::cpu::attention::attention_backward (its softmax-backward row dot,
// Σ_j att·datt = Σ_d dout·out, computed the flash way). delta (B,NH,T).
extern "C" __global__ void attention_backward_delta(float* delta, const float* dout, const float* out, int B, int T, int C, int NH) {
    const long long idx = global_index();
    if (idx >= (long long)B * NH * T) return;
    const int hs = C / NH;
    const int i = (int)(idx % T);
    const long long bh = idx / T;
    const int b = (int)(bh / NH), h = (int)(bh % NH);
    const long long at = ((long long)b * T + i) * C + (long long)h * hs;
    float acc = 0.0f;
    for (int d = 0; d < hs; d++) acc += dout[at + d] * out[at + d];
    delta[idx] = acc;
}

// dQ for one query row per thread: dq_i = scale·Σ_{j<=i} p_ij·(dout_i·v_j − delta_i)·k_j.
// CPU reference: backend::cpu::attention::attention_backward (the dQ = dpre·K product).
// CPU reference: backend::cpu::gqa_attention::gqa_backward (likewise).
template <int MAXHS, bool GQA>
__device__ void attention_backward_dq_impl(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                           const float* delta, int B, int T, int C, int NH, int NKV) {
    extern __shared__ float smem[];
    const int hs = C / NH;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const long long rs = ATT_ROW_STRIDE(GQA, C, NKV, hs);
    const int voff = ATT_VOFF(GQA, C, NKV, hs);
    const float* base = qkv + (long long)b * T * rs + (long long)h * hs;
    const float* kvbase = GQA ? qkv + (long long)b * T * rs + (long long)(h / (NH / NKV)) * hs : base;
    float* ks = smem;
    float* vs = smem + ATT_TILE * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    float q[MAXHS], g[MAXHS], dq[MAXHS];
    const float* grow = dout + ((long long)b * T + (i < T ? i : 0)) * C + (long long)h * hs;
#pragma unroll
    for (int d = 0; d < MAXHS; d++) {
        q[d] = (i < T && d < hs) ? base[(long long)i * rs + d] * scale : 0.0f;
        g[d] = (i < T && d < hs) ? grow[d] : 0.0f;
        dq[d] = 0.0f;
    }
    const float li = i < T ? lse[(long long)bh * T + i] : 0.0f;
    const float di = i < T ? delta[(long long)bh * T + i] : 0.0f;
    const int last_query = min(T - 1, (int)((blockIdx.x + 1) * blockDim.x) - 1);
    for (int j0 = 0; j0 <= last_query; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * hs; e += blockDim.x) {
            const int j = j0 + e / hs, d = e % hs;
            ks[e] = j < T ? kvbase[(long long)j * rs + C + d] : 0.0f;
            vs[e] = j < T ? kvbase[(long long)j * rs + voff + d] : 0.0f;
        }
        __syncthreads();
        if (i >= T) continue;
        const int jend = min(ATT_TILE, i - j0 + 1);
        for (int jj = 0; jj < jend; jj++) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int d = 0; d < MAXHS; d++)
                if (d < hs) {
                    s += q[d] * ks[jj * hs + d];
                    dp += g[d] * vs[jj * hs + d];
                }
            const float ds = expf(s - li) * (dp - di);
#pragma unroll
            for (int d = 0; d < MAXHS; d++)
                if (d < hs) dq[d] += ds * ks[jj * hs + d];
        }
    }
    if (i >= T) return;
    float* dqrow = dqkv + ((long long)b * T + i) * rs + (long long)h * hs;
#pragma unroll
    for (int d = 0; d < MAXHS; d++)
        if (d < hs) dqrow[d] = dq[d] * scale;
}

// dK and dV for one key row per thread, summed over the query heads h of the key's group:
// dv_j = Σ_h Σ_{i>=j} p_hij·dout_hi, dk_j = scale·Σ_h Σ_{i>=j} p_hij·(dout_hi·v_j − delta_hi)·q_hi.
// CPU reference: backend::cpu::attention::attention_backward (dV = attᵀ·dout, dK = dpreᵀ·Q).
// CPU reference: backend::cpu::gqa_attention::gqa_backward (the same, accumulated over the group).
// Grid (ceil(T/blockDim), B·NKV); one query head per key head for GPT-2.
template <int MAXHS, bool GQA>
__device__ void attention_backward_dkdv_impl(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                             const float* delta, int B, int T, int C, int NH, int NKV) {
    extern __shared__ float smem[];
    const int hs = C / NH;
    const int group = GQA ? NH / NKV : 1;
    const int nkv = GQA ? NKV : NH;
    const int bg = blockIdx.y, b = bg / nkv, g = bg % nkv;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const long long rs = ATT_ROW_STRIDE(GQA, C, NKV, hs);
    const int voff = ATT_VOFF(GQA, C, NKV, hs);
    const float* kvbase = qkv + (long long)b * T * rs + (long long)g * hs;
    float* qs = smem;
    float* gs = smem + ATT_TILE * hs;
    float* ls = smem + 2 * ATT_TILE * hs;
    float* ds_ = ls + ATT_TILE;
    const float scale = 1.0f / sqrtf((float)hs);
    float k[MAXHS], v[MAXHS], dk[MAXHS], dv[MAXHS];
#pragma unroll
    for (int d = 0; d < MAXHS; d++) {
        k[d] = (j < T && d < hs) ? kvbase[(long long)j * rs + C + d] : 0.0f;
        v[d] = (j < T && d < hs) ? kvbase[(long long)j * rs + voff + d] : 0.0f;
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }
    // Queries before the block's first key see none of its keys.
    const int first_query = blockIdx.x * blockDim.x;
    for (int hh = 0; hh < group; hh++) {
        const int h = g * group + hh;
        const int bh = GQA ? b * NH + h : bg;
        const float* base = GQA ? qkv + (long long)b * T * rs + (long long)h * hs : kvbase;
        const float* gbase = dout + (long long)b * T * C + (long long)h * hs;
        for (int i0 = first_query - first_query % ATT_TILE; i0 < T; i0 += ATT_TILE) {
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_TILE * hs; e += blockDim.x) {
                const int i = i0 + e / hs, d = e % hs;
                qs[e] = i < T ? base[(long long)i * rs + d] * scale : 0.0f;
                gs[e] = i < T ? gbase[(long long)i * C + d] : 0.0f;
            }
            for (int e = threadIdx.x; e < ATT_TILE; e += blockDim.x) {
                const int i = i0 + e;
                ls[e] = i < T ? lse[(long long)bh * T + i] : 0.0f;
                ds_[e] = i < T ? delta[(long long)bh * T + i] : 0.0f;
            }
            __syncthreads();
            if (j >= T) continue;
            const int istart = max(0, j - i0);
            const int iend = min(ATT_TILE, T - i0);
            for (int ii = istart; ii < iend; ii++) {
                float s = 0.0f, dp = 0.0f;
#pragma unroll
                for (int d = 0; d < MAXHS; d++)
                    if (d < hs) {
                        s += qs[ii * hs + d] * k[d];
                        dp += gs[ii * hs + d] * v[d];
                    }
                const float p = expf(s - ls[ii]);
                const float ds = p * (dp - ds_[ii]);
#pragma unroll
                for (int d = 0; d < MAXHS; d++)
                    if (d < hs) {
                        dv[d] += p * gs[ii * hs + d];
                        // qs already carries the 1/√hs scale.
                        dk[d] += ds * qs[ii * hs + d];
                    }
            }
        }
    }
    if (j >= T) return;
    float* row = dqkv + ((long long)b * T + j) * rs + (long long)g * hs;
#pragma unroll
    for (int d = 0; d < MAXHS; d++)
        if (d < hs) {
            row[C + d] = dk[d];
            row[voff + d] = dv[d];
        }
}

// The kernels each ATT_INSTANTIATE(HS) declares, for head sizes up to HS:
// attention_forward_hsHS: CPU reference: backend::cpu::attention::attention_forward (via the impl above)
// attention_backward_dq_hsHS: CPU reference: backend::cpu::attention::attention_backward (dQ)
// attention_backward_dkdv_hsHS: CPU reference: backend::cpu::attention::attention_backward (dK, dV)
// gqa_attention_forward_hsHS: CPU reference: backend::cpu::gqa_attention::gqa_forward
// gqa_attention_backward_dq_hsHS: CPU reference: backend::cpu::gqa_attention::gqa_backward (dQ)
// gqa_attention_backward_dkdv_hsHS: CPU reference: backend::cpu::gqa_attention::gqa_backward (dK, dV)
// GPT-2's take (C, NH) and set NKV = NH, hs = C/NH; the GQA ones take (NH, NKV, hs), NH a
// multiple of NKV (checked by the host). dq and dkdv launch over (B·NH) and (B·NKV) block rows.
#define ATT_INSTANTIATE(HS)                                                                                        \
    extern "C" __global__ void attention_forward_hs##HS(float* out, float* lse, const float* qkv, int B, int T,    \
                                                        int C, int NH) {                                           \
        attention_forward_impl<HS, false>(out, lse, qkv, B, T, C, NH, NH);                                         \
    }                                                                                                              \
    extern "C" __global__ void attention_backward_dq_hs##HS(float* dqkv, const float* dout, const float* qkv,      \
                                                            const float* lse, const float* delta, int B, int T,    \
                                                            int C, int NH) {                                       \
        attention_backward_dq_impl<HS, false>(dqkv, dout, qkv, lse, delta, B, T, C, NH, NH);                       \
    }                                                                                                              \
    extern "C" __global__ void attention_backward_dkdv_hs##HS(float* dqkv, const float* dout, const float* qkv,    \
                                                              const float* lse, const float* delta, int B, int T,  \
                                                              int C, int NH) {                                     \
        attention_backward_dkdv_impl<HS, false>(dqkv, dout, qkv, lse, delta, B, T, C, NH, NH);                     \
    }                                                                                                              \
    extern "C" __global__ void gqa_attention_forward_hs##HS(float* out, float* lse, const float* qkv, int B,       \
                                                            int T, int NH, int NKV, int hs) {                      \
        attention_forward_impl<HS, true>(out, lse, qkv, B, T, NH * hs, NH, NKV);                                   \
    }                                                                                                              \
    extern "C" __global__ void gqa_attention_backward_dq_hs##HS(float* dqkv, const float* dout, const float* qkv,  \
                                                                const float* lse, const float* delta, int B,       \
                                                                int T, int NH, int NKV, int hs) {                  \
        attention_backward_dq_impl<HS, true>(dqkv, dout, qkv, lse, delta, B, T, NH * hs, NH, NKV);                 \
    }                                                                                                              \
    extern "C" __global__ void gqa_attention_backward_dkdv_hs##HS(float* dqkv, const float* dout,                  \
                                                                  const float* qkv, const float* lse,              \
                                                                  const float* delta, int B, int T, int NH,        \
                                                                  int NKV, int hs) {                               \
        attention_backward_dkdv_impl<HS, true>(dqkv, dout, qkv, lse, delta, B, T, NH * hs, NH, NKV);               \
    }

ATT_INSTANTIATE(32)
ATT_INSTANTIATE(64)
ATT_INSTANTIATE(128)

// CPU reference: backend::cpu::attention::attention_forward_cached
// n new tokens at positions pos0..pos0+n against a KV cache holding positions 0..pos0+n.
// out (n,C); q (n,3C) rows whose first C columns are the queries; k_cache, v_cache (maxT,C).
// One block per (new token i, head h); dynamic shared memory holds pos0+n scores.
extern "C" __global__ void attention_forward_cached(float* out, const float* q, const float* k_cache, const float* v_cache,
                                                    int pos0, int n, int C, int NH) {
    extern __shared__ float scores[];
    const int i = blockIdx.x, h = blockIdx.y;
    if (i >= n) return;
    const int hs = C / NH;
    const int len = pos0 + i + 1;
    const float scale = 1.0f / sqrtf((float)hs);
    const float* qh = q + (long long)i * 3 * C + (long long)h * hs;
    float m = -LD_INF;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* kh = k_cache + (long long)j * C + (long long)h * hs;
        float s = 0.0f;
        for (int d = 0; d < hs; d++) s += qh[d] * kh[d];
        s *= scale;
        scores[j] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float p = expf(scores[j] - m);
        scores[j] = p;
        sum += p;
    }
    sum = block_sum(sum);
    __syncthreads();
    const float inv = 1.0f / sum;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; j++) acc += scores[j] * v_cache[(long long)j * C + (long long)h * hs + d];
        out[(long long)i * C + (long long)h * hs + d] = acc * inv;
    }
}

// CPU reference: generate::Generator::feed (its copy of new keys and values into the cache)
// k_cache[pos0 + i, :] = qkv[i, C:2C], v_cache[pos0 + i, :] = qkv[i, 2C:3C] for the n new rows.
extern "C" __global__ void kv_cache_write(float* k_cache, float* v_cache, const float* qkv, int pos0, int n, int C) {
    const long long idx = global_index();
    if (idx >= (long long)n * C) return;
    const long long i = idx / C, c = idx % C;
    k_cache[(pos0 + i) * C + c] = qkv[i * 3 * C + C + c];
    v_cache[(pos0 + i) * C + c] = qkv[i * 3 * C + 2 * C + c];
}
