// AdamW on f32 master weights, writing the bf16 copy the matmuls read in the same pass.

// CPU reference: optim::AdamW::step (one parameter span; the host launches once per span with
// that span's decay factor, 1 − lr·wd for matrices and embeddings, 1 for biases and LayerNorm).
// m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; p = p·decay − step_size·m / (√v/√bc2 + eps),
// step_size = lr / bc1. params_bf16 may be null (f32-only runs).
extern "C" __global__ void adamw_step(float* params, __nv_bfloat16* params_bf16, const float* grads, float* m, float* v,
                                      long long n, float step_size, float bc2_sqrt, float beta1, float beta2,
                                      float eps, float decay) {
    const long long i = global_index();
    if (i >= n) return;
    const float g = grads[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    const float p = params[i] * decay - step_size * mi / denom;
    params[i] = p;
    if (params_bf16) params_bf16[i] = __float2bfloat16_rn(p);
}
