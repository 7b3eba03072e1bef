// Fused softmax + cross-entropy over the real vocabulary, with an ignore index and per-position
// loss weights; the logits buffer becomes dlogits in place (as on the CPU).

#define CE_IGNORE_INDEX (-1)

// CPU reference: backend::cpu::crossentropy::softmax_crossentropy
// Per row i of logits (N,Vp): losses[i] = logsumexp(logits[i,:V]) − logits[i,target] (0 when the
// target is IGNORE_INDEX). With grad != 0 the row is overwritten by (softmax − onehot)·w_i·scale,
// w_i = weights[i] or 1 when weights is null; padded columns and ignored rows become 0.
// One block per row (blockDim a multiple of 32).
extern "C" __global__ void softmax_crossentropy(float* logits, float* losses, const int* targets, const float* weights,
                                                float scale, int N, int V, int Vp, int grad) {
    const int row = blockIdx.x;
    if (row >= N) return;
    float* x = logits + (long long)row * Vp;
    const int target = targets[row];
    if (target == CE_IGNORE_INDEX) {
        if (threadIdx.x == 0) losses[row] = 0.0f;
        if (grad)
            for (int i = threadIdx.x; i < Vp; i += blockDim.x) x[i] = 0.0f;
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
        x[i] = i == target ? p - w : p;
    }
    for (int i = V + threadIdx.x; i < Vp; i += blockDim.x) x[i] = 0.0f;
}
