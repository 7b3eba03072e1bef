// LayerNorm over the channel dimension, eps = 1e-5 (GPT-2's).

#define LN_EPS 1e-5f

// One row of LayerNorm by one warp, given this lane's partial sum `s` of the row x (its elements
// lane, lane + 32, ...): the mean, the variance from squared deviations (a second pass, like the
// CPU), and out = (x − mean)·rstd·weight + bias to `o` and as bf16 (round to nearest even) to
// `ob`, each when it is not null; lane 0 writes mean and rstd.
__device__ __forceinline__ void layernorm_row(float* o, __nv_bfloat16* ob, float* mean, float* rstd, const float* x,
                                              float s, const float* weight, const float* bias, int C, int lane) {
    const float mu = warp_sum(s) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += LD_WARP) {
        const float d = x[i] - mu;
        v += d * d;
    }
    const float r = 1.0f / sqrtf(warp_sum(v) / C + LN_EPS);
    for (int i = lane; i < C; i += LD_WARP) {
        const float y = (x[i] - mu) * r * weight[i] + bias[i];
        if (o) o[i] = y;
        if (ob) ob[i] = __float2bfloat16_rn(y);
    }
    if (lane == 0) {
        *mean = mu;
        *rstd = r;
    }
}

// CPU reference: backend::cpu::layernorm::layernorm_forward
// out = (inp − mean)·rstd·weight + bias per row; out, inp (N,C); mean, rstd (N); weight, bias (C).
// One warp per row, two passes (mean, then squared deviations) like the CPU. With out_bf16 not
// null, out rounded to bf16 goes there too: the next matmul's operand, with no cast kernel.
// out may then be null, when nothing reads the f32 values (a bf16 model's inner LayerNorms).
// Launched with 256 threads; __launch_bounds__(256, 8) keeps ptxas at 32 registers (eight
// blocks, a full SM on sm_90), which the optional outputs would otherwise push to 40.
extern "C" __global__ void __launch_bounds__(256, 8) layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                             const float* weight, const float* bias, int N, int C,
                                             __nv_bfloat16* out_bf16) {
    const int warps = blockDim.x / LD_WARP;
    const int row = blockIdx.x * warps + threadIdx.x / LD_WARP;
    const int lane = threadIdx.x % LD_WARP;
    if (row >= N) return;
    const float* x = inp + (long long)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += LD_WARP) s += x[i];
    __nv_bfloat16* ob = out_bf16 ? out_bf16 + (long long)row * C : nullptr;
    layernorm_row(out ? out + (long long)row * C : nullptr, ob, mean + row, rstd + row, x, s, weight, bias, C, lane);
}

// CPU reference: backend::cpu::residual::residual_forward, then backend::cpu::layernorm::layernorm_forward
// residual = a + b, then out = LayerNorm(residual): a block's residual add and the LayerNorm
// that follows it (the next block's first, or the final one) in one launch, so the residual
// stream is read twice and written once instead of read three times and written once. One
// warp per row; each lane reads back only the elements it wrote itself, and the sums run in
// layernorm_forward's order, so the results are those two kernels' bit for bit. out and out_bf16
// as in layernorm_forward.
extern "C" __global__ void __launch_bounds__(256, 8) residual_layernorm_forward(float* residual, float* out, float* mean, float* rstd,
                                                      const float* a, const float* b, const float* weight,
                                                      const float* bias, int N, int C, __nv_bfloat16* out_bf16) {
    const int warps = blockDim.x / LD_WARP;
    const int row = blockIdx.x * warps + threadIdx.x / LD_WARP;
    const int lane = threadIdx.x % LD_WARP;
    if (row >= N) return;
    const long long base = (long long)row * C;
    float* x = residual + base;
    float s = 0.0f;
    for (int i = lane; i < C; i += LD_WARP) {
        const float r = a[base + i] + b[base + i];
        x[i] = r;
        s += r;
    }
    layernorm_row(out ? out + base : nullptr, out_bf16 ? out_bf16 + base : nullptr, mean + row, rstd + row, x, s, weight, bias, C, lane);
}

// CPU reference: backend::cpu::layernorm::layernorm_backward (the dinp half)
// dinp += (dnorm − mean(dnorm) − norm·mean(dnorm·norm))·rstd with dnorm = weight·dout
// (accumulated: the residual stream's gradient arrives from two branches). One warp per row.
// With dinp_bf16 not null, the accumulated dinp rounded to bf16 goes there too: the next
// matmul backward's gradient operand, with no cast kernel.
extern "C" __global__ void layernorm_backward_input(float* dinp, const float* dout, const float* inp, const float* weight,
                                                    const float* mean, const float* rstd, int N, int C,
                                                    __nv_bfloat16* dinp_bf16) {
    const int warps = blockDim.x / LD_WARP;
    const int row = blockIdx.x * warps + threadIdx.x / LD_WARP;
    const int lane = threadIdx.x % LD_WARP;
    if (row >= N) return;
    const long long base = (long long)row * C;
    const float mu = mean[row], r = rstd[row];
    float dm = 0.0f, dnm = 0.0f;
    for (int i = lane; i < C; i += LD_WARP) {
        const float norm = (inp[base + i] - mu) * r;
        const float dnorm = weight[i] * dout[base + i];
        dm += dnorm;
        dnm += dnorm * norm;
    }
    dm = warp_sum(dm) / C;
    dnm = warp_sum(dnm) / C;
    for (int i = lane; i < C; i += LD_WARP) {
        const float norm = (inp[base + i] - mu) * r;
        const float dnorm = weight[i] * dout[base + i];
        const float v = dinp[base + i] + (dnorm - dm - norm * dnm) * r;
        dinp[base + i] = v;
        if (dinp_bf16) dinp_bf16[base + i] = __float2bfloat16_rn(v);
    }
}

// CPU reference: backend::cpu::layernorm::layernorm_backward (the dweight/dbias half, stage 1)
// partial[k, 0:C] = Σ_{rows of chunk k} dout·x̂ and partial[k, C:2C] = Σ dout, for chunk k of
// `rows_per_chunk` rows. Grid (ceil(C/blockDim), chunks); one thread per column, rows in order.
// Stage 2 is residual.cu's column_sum_reduce, run once for dweight and once for dbias.
extern "C" __global__ void layernorm_backward_params_partial(float* partial, const float* dout, const float* inp,
                                                             const float* mean, const float* rstd,
                                                             int N, int C, int rows_per_chunk) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int k = blockIdx.y;
    if (col >= C) return;
    const int r0 = k * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    for (int row = r0; row < r1; row++) {
        const long long at = (long long)row * C + col;
        const float g = dout[at];
        dw += g * (inp[at] - mean[row]) * rstd[row];
        db += g;
    }
    partial[(long long)k * 2 * C + col] = dw;
    partial[(long long)k * 2 * C + C + col] = db;
}
