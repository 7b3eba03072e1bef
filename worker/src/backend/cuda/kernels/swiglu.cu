// SwiGLU, the Llama MLP's activation: out = silu(gate)·up with silu(g) = g·σ(g). The input is
// the fused (N, 2I) projection, gate in the first I columns of a row and up in the last I.

__device__ __forceinline__ float swiglu_sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}

// CPU reference: backend::cpu::swiglu::swiglu_forward
// out (N,I) = silu(inp[:, :I])·inp[:, I:]; inp (N,2I). One thread per output element.
extern "C" __global__ void swiglu_forward(float* out, const float* inp, int N, int I) {
    const long long idx = global_index();
    if (idx >= (long long)N * I) return;
    const long long row = idx / I;
    const int k = (int)(idx % I);
    const float g = inp[row * 2 * I + k];
    const float u = inp[row * 2 * I + I + k];
    out[idx] = g * swiglu_sigmoid(g) * u;
}

// CPU reference: backend::cpu::swiglu::swiglu_backward
// dinp (N,2I) (overwritten) from dout (N,I): dgate = dout·up·σ(g)·(1 + g·(1 − σ(g))),
// dup = dout·silu(g). One thread per (row, k), writing both halves.
extern "C" __global__ void swiglu_backward(float* dinp, const float* inp, const float* dout, int N, int I) {
    const long long idx = global_index();
    if (idx >= (long long)N * I) return;
    const long long row = idx / I;
    const int k = (int)(idx % I);
    const long long at = row * 2 * I + k;
    const float g = inp[at];
    const float u = inp[at + I];
    const float d = dout[idx];
    const float s = swiglu_sigmoid(g);
    dinp[at] = d * u * s * (1.0f + g * (1.0f - s));
    dinp[at + I] = d * g * s;
}
