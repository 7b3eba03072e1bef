// Token + position embedding, forward and backward.

// CPU reference: backend::cpu::encoder::encoder_forward
// out[b,t,:] = wte[inp[b,t],:] + wpe[pos0 + t,:]
// out (B,T,C); inp (B,T) token ids < V (checked by the host); wte (Vp,C); wpe (maxT,C).
// One thread per output element.
extern "C" __global__ void encoder_forward(float* out, const unsigned int* inp, const float* wte, const float* wpe,
                                           int B, int T, int C, int pos0) {
    const long long idx = global_index();
    if (idx >= (long long)B * T * C) return;
    const int c = (int)(idx % C);
    const long long bt = idx / C;
    const int t = (int)(bt % T);
    const long long tok = inp[bt];
    out[idx] = wte[tok * C + c] + wpe[(long long)(pos0 + t) * C + c];
}

// CPU reference: backend::cpu::encoder::encoder_backward (the dwpe half)
// dwpe[t,:] += Σ_b dout[b,t,:]; one thread per (t, c), batches summed in order (deterministic).
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const float* dout, int B, int T, int C) {
    const long long idx = global_index();
    if (idx >= (long long)T * C) return;
    const int c = (int)(idx % C);
    const int t = (int)(idx / C);
    float acc = 0.0f;
    for (int b = 0; b < B; b++) acc += dout[((long long)b * T + t) * C + c];
    dwpe[(long long)t * C + c] += acc;
}

// CPU reference: backend::cpu::encoder::encoder_backward (the dwte half)
// dwte[inp[b,t],:] += dout[b,t,:]. Atomics: a token that repeats in the batch adds in an
// unspecified order, so dwte is not bit-reproducible (it matches the CPU within rounding).
extern "C" __global__ void encoder_backward_wte(float* dwte, const float* dout, const unsigned int* inp, int B, int T, int C) {
    const long long idx = global_index();
    if (idx >= (long long)B * T * C) return;
    const int c = (int)(idx % C);
    const long long bt = idx / C;
    atomicAdd(&dwte[(long long)inp[bt] * C + c], dout[idx]);
}
