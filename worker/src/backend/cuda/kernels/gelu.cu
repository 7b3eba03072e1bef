// GELU with the tanh approximation (Hugging Face's gelu_new, GPT-2's activation).

#define GELU_SQRT_2_OVER_PI 0.7978845608f
#define GELU_COEF 0.044715f

// CPU reference: backend::cpu::gelu::gelu_forward
// out = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), element-wise over n values, to out and as
// bf16 (round to nearest even) to out_bf16, each when it is not null: a bf16 model keeps only
// the bf16 copy, the operand of the matmul after it.
extern "C" __global__ void gelu_forward(float* out, const float* inp, long long n, __nv_bfloat16* out_bf16) {
    const long long i = global_index();
    if (i >= n) return;
    const float x = inp[i];
    const float u = GELU_SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
    const float y = 0.5f * x * (1.0f + tanhf(u));
    if (out) out[i] = y;
    if (out_bf16) out_bf16[i] = __float2bfloat16_rn(y);
}

// CPU reference: backend::cpu::gelu::gelu_backward
// dinp = dout·gelu'(inp) (overwritten).
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, long long n) {
    const long long i = global_index();
    if (i >= n) return;
    const float x = inp[i];
    const float u = GELU_SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
    const float th = tanhf(u);
    const float sech2 = 1.0f - th * th;
    const float du = GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_COEF * x * x);
    dinp[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * x * sech2 * du);
}
