// RMSNorm over the channel dimension (Llama's and Qwen2's normalisation): out = x·rstd·weight
// with rstd = 1/√(mean(x²) + eps); no mean subtraction, no bias. eps comes from the model's
// config (1e-5 or 1e-6), so it is an argument.

// CPU reference: backend::cpu::rmsnorm::rmsnorm_forward
// out = weight·(x·rstd) per row (the normalised value rounded before the weight multiplies it,
// as Hugging Face does); out, inp (N,C); rstd (N) saved for the backward; weight (C).
// One warp per row.
extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C, float eps) {
    const int warps = blockDim.x / LD_WARP;
    const int row = blockIdx.x * warps + threadIdx.x / LD_WARP;
    const int lane = threadIdx.x % LD_WARP;
    if (row >= N) return;
    const float* x = inp + (long long)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += LD_WARP) s += x[i] * x[i];
    const float r = 1.0f / sqrtf(warp_sum(s) / C + eps);
    float* o = out + (long long)row * C;
    for (int i = lane; i < C; i += LD_WARP) o[i] = weight[i] * (x[i] * r);
    if (lane == 0) rstd[row] = r;
}

// CPU reference: backend::cpu::rmsnorm::rmsnorm_backward (the dinp half)
// dinp += rstd·(w·g − x̂·mean(w·g·x̂)) with x̂ = x·rstd (accumulated: the residual stream's
// gradient arrives from two branches). One warp per row.
extern "C" __global__ void rmsnorm_backward_input(float* dinp, const float* dout, const float* inp, const float* weight,
                                                  const float* rstd, int N, int C) {
    const int warps = blockDim.x / LD_WARP;
    const int row = blockIdx.x * warps + threadIdx.x / LD_WARP;
    const int lane = threadIdx.x % LD_WARP;
    if (row >= N) return;
    const long long base = (long long)row * C;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int i = lane; i < C; i += LD_WARP) dot += weight[i] * dout[base + i] * inp[base + i] * r;
    const float mean = warp_sum(dot) / C;
    for (int i = lane; i < C; i += LD_WARP) {
        const float x = inp[base + i];
        dinp[base + i] += r * (weight[i] * dout[base + i] - x * r * mean);
    }
}

// CPU reference: backend::cpu::rmsnorm::rmsnorm_backward (the dweight half, stage 1)
// partial[k, c] = Σ_{rows of chunk k} dout·x·rstd for chunk k of `rows_per_chunk` rows.
// Grid (ceil(C/blockDim), chunks); one thread per column, rows in order (deterministic).
// Stage 2 is residual.cu's column_sum_reduce, which adds the chunks in order into dweight.
extern "C" __global__ void rmsnorm_backward_weight_partial(float* partial, const float* dout, const float* inp, const float* rstd,
                                                           int N, int C, int rows_per_chunk) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int k = blockIdx.y;
    if (col >= C) return;
    const int r0 = k * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float dw = 0.0f;
    for (int row = r0; row < r1; row++) {
        const long long at = (long long)row * C + col;
        dw += dout[at] * inp[at] * rstd[row];
    }
    partial[(long long)k * C + col] = dw;
}
