// Fused softmax + cross-entropy over the real vocabulary, with an ignore index and per-position
// loss weights; the logits buffer becomes dlogits in place (as on the CPU).

#define CE_IGNORE_INDEX (-1)

// CPU reference: backend::cpu::crossentropy::softmax_crossentropy
// Per row i of logits (N,Vp): losses[i] = logsumexp(logits[i,:V]) − logits[i,target] (0 when the
// target is IGNORE_INDEX). With grad != 0 the gradient (softmax − onehot)·w_i·scale, w_i =
// weights[i] or 1 when weights is null, 0 in padded columns and ignored rows, overwrites the row
// in place, or, when dlogits_bf16 is not null, goes there as bf16 (round to nearest even) and
// the logits stay as they are: the fused classifier of the bf16 path, which hands the LM head's
// backward gemm its operand directly instead of an f32 gradient for a separate cast.
// One block per row (blockDim a multiple of 32).
extern "C" __global__ void softmax_crossentropy(float* logits, float* losses, const int* targets, const float* weights,
                                                float scale, int N, int V, int Vp, int grad,
                                                __nv_bfloat16* dlogits_bf16) {
    const int row = blockIdx.x;
    if (row >= N) return;
    float* x = logits + (long long)row * Vp;
    __nv_bfloat16* d = dlogits_bf16 ? dlogits_bf16 + (long long)row * Vp : nullptr;
    const int target = targets[row];
    if (target == CE_IGNORE_INDEX) {
        if (threadIdx.x == 0) losses[row] = 0.0f;
        if (grad)
            for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
                if (d) d[i] = __float2bfloat16_rn(0.0f);
                else x[i] = 0.0f;
            }
        return;
    }
    float m = -LD_INF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(x[i] - m);
    s = block_sum(s);
    const float xt = x[target];
    if (threadIdx.x == 0) losses[row] = logf(s) + m - xt;
    if (!grad) return;
    // Every thread has read x[target] (above) before any thread overwrites it.
    __syncthreads();
    const float w = (weights ? weights[row] : 1.0f) * scale;
    const float inv = 1.0f / s;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float p = expf(x[i] - m) * inv * w;
        const float g = i == target ? p - w : p;
        if (d) d[i] = __float2bfloat16_rn(g);
        else x[i] = g;
    }
    for (int i = V + threadIdx.x; i < Vp; i += blockDim.x) {
        if (d) d[i] = __float2bfloat16_rn(0.0f);
        else x[i] = 0.0f;
    }
}

// CPU reference: the step's loss as crate::model::gpt::Gpt::loss sums it: Σ_i w_i·losses[i] over
// the rows whose target is not IGNORE_INDEX (w_i = weights[i], or 1 when weights is null), in
// double, divided by denom and added to acc[0]. It stays on the device, so a step with many
// micro-batches reads its loss back once. One block; the order of the sum depends only on N
// and the block size, so the bits are reproducible.
extern "C" __global__ void loss_sum(double* acc, const float* losses, const int* targets, const float* weights, int N,
                                    float denom) {
    if (blockIdx.x != 0) return;
    double s = 0.0;
    for (int i = threadIdx.x; i < N; i += blockDim.x)
        if (targets[i] != CE_IGNORE_INDEX) s += (double)(weights ? weights[i] : 1.0f) * (double)losses[i];
    s = block_sum_d(s);
    if (threadIdx.x == 0) acc[0] += s / (double)denom;
}
