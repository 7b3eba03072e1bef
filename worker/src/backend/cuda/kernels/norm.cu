// Global gradient norm and clipping, without a round trip to the host in between.

// CPU reference: optim::global_norm (stage 1)
// partial[blockIdx.x] = Σ g² over a grid-stride range, in double. The host launches a fixed
// grid, so the summation order (and the bits) depend only on n.
extern "C" __global__ void global_norm_partial(double* partial, const float* g, long long n) {
    double acc = 0.0;
    for (long long i = global_index(); i < n; i += (long long)gridDim.x * blockDim.x) {
        const double x = g[i];
        acc += x * x;
    }
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// CPU reference: optim::global_norm (stage 2): norm[0] = √(Σ partial), summed in order by one thread.
extern "C" __global__ void global_norm_finish(float* norm, const double* partial, int blocks) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int k = 0; k < blocks; k++) s += partial[k];
    norm[0] = (float)sqrt(s);
}

// CPU reference: optim::clip_grad_norm (its scaling): g *= max_norm/(norm + 1e-6) when that is < 1.
extern "C" __global__ void clip_scale(float* g, long long n, const float* norm, float max_norm) {
    const float coef = max_norm / (norm[0] + 1e-6f);
    if (coef >= 1.0f) return;
    for (long long i = global_index(); i < n; i += (long long)gridDim.x * blockDim.x) g[i] *= coef;
}
