// The scalar head of reward and value models: r = h·w + b on chosen rows of the final hidden
// states (the last answer token of each sequence).

// CPU reference: phase::reward::ScalarHead::score
// r[i] = hidden[rows[i], :]·w + bias for i < n; hidden (B·T, C), w (C). One warp per score.
extern "C" __global__ void scalar_head_forward(float* r, const float* hidden, const int* rows, const float* w,
                                               float bias, int n, int C) {
    const int warps = blockDim.x / LD_WARP;
    const int i = blockIdx.x * warps + threadIdx.x / LD_WARP;
    const int lane = threadIdx.x % LD_WARP;
    if (i >= n) return;
    const float* h = hidden + (long long)rows[i] * C;
    float acc = 0.0f;
    for (int k = lane; k < C; k += LD_WARP) acc += h[k] * w[k];
    acc = warp_sum(acc);
    if (lane == 0) r[i] = acc + bias;
}

// CPU reference: phase::reward::run_reward (the head's backward: dh = dr·w on the scored rows)
// dhidden[rows[i], k] = dr[i]·w[k]; the other rows of dhidden are left as they are (the host
// zeroes dhidden first). Rows must be distinct.
extern "C" __global__ void scalar_head_backward_hidden(float* dhidden, const float* dr, const int* rows, const float* w,
                                                       int n, int C) {
    const long long idx = global_index();
    if (idx >= (long long)n * C) return;
    const int i = (int)(idx / C), k = (int)(idx % C);
    dhidden[(long long)rows[i] * C + k] = dr[i] * w[k];
}

// CPU reference: phase::reward::run_reward (the head's parameter gradient)
// dw[k] += Σ_i dr[i]·hidden[rows[i], k] for k < C, and dw[C] += Σ_i dr[i] (the bias), i in order.
extern "C" __global__ void scalar_head_backward_params(float* dw, const float* dr, const float* hidden, const int* rows,
                                                       int n, int C) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k > C) return;
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += dr[i] * (k < C ? hidden[(long long)rows[i] * C + k] : 1.0f);
    dw[k] += acc;
}
