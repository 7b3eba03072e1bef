// Residual add, bias add and bias gradient (column sums), and the f32 → bf16 cast that feeds
// cuBLASLt's bf16 matmuls.

// CPU reference: backend::cpu::residual::residual_forward
// out = a + b, n values.
extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, long long n) {
    const long long i = global_index();
    if (i >= n) return;
    out[i] = a[i] + b[i];
}

// CPU reference: backend::cpu::matmul::matmul_forward (its bias broadcast)
// out[row, :] = bias for every row of out (N,OC); the matmul then accumulates onto it (beta = 1).
extern "C" __global__ void bias_broadcast(float* out, const float* bias, int N, int OC) {
    const long long i = global_index();
    if (i >= (long long)N * OC) return;
    out[i] = bias[i % OC];
}

// CPU reference: backend::cpu::add_column_sums (stage 1: partial sums of row chunks)
// partial[k, c] = Σ_{rows of chunk k} src[row, c]; src (N,C). Grid (ceil(C/blockDim), chunks);
// one thread per column, rows in order, so the result does not depend on scheduling.
extern "C" __global__ void column_sum_partial(float* partial, const float* src, int N, int C, int rows_per_chunk) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int k = blockIdx.y;
    if (col >= C) return;
    const int r0 = k * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int row = r0; row < r1; row++) acc += src[(long long)row * C + col];
    partial[(long long)k * C + col] = acc;
}

// CPU reference: backend::cpu::add_column_sums (stage 2)
// dst[c] += Σ_k partial[k·stride + c] over `chunks` partials, in order.
extern "C" __global__ void column_sum_reduce(float* dst, const float* partial, int chunks, int C, long long stride) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= C) return;
    float acc = 0.0f;
    for (int k = 0; k < chunks; k++) acc += partial[(long long)k * stride + col];
    dst[col] += acc;
}

// No CPU counterpart (the CPU backend is f32 throughout): dst = bf16(src), round to nearest even.
extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* dst, const float* src, long long n) {
    const long long i = global_index();
    if (i >= n) return;
    dst[i] = __float2bfloat16_rn(src[i]);
}
