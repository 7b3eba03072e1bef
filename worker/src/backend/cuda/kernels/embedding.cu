// Token embedding without positions (the llama family's positions are rotary, applied to the
// queries and keys by rope.cu): out[n,:] = wte[inp[n],:].

// CPU reference: backend::cpu::embedding::embedding_forward
// out (N,C); inp (N) token ids < V (checked by the host); wte (Vp,C). One thread per element.
extern "C" __global__ void embedding_forward(float* out, const unsigned int* inp, const float* wte, int N, int C) {
    const long long idx = global_index();
    if (idx >= (long long)N * C) return;
    const long long row = idx / C;
    const int c = (int)(idx % C);
    out[idx] = wte[(long long)inp[row] * C + c];
}

// CPU reference: backend::cpu::embedding::embedding_backward
// dwte[inp[n],:] += dout[n,:]. Atomics (as encoder.cu's encoder_backward_wte): a token that
// repeats in the batch adds in an unspecified order, so dwte is not bit-reproducible (it
// matches the CPU, which adds the rows in order, within rounding).
extern "C" __global__ void embedding_backward(float* dwte, const float* dout, const unsigned int* inp, int N, int C) {
    const long long idx = global_index();
    if (idx >= (long long)N * C) return;
    const long long row = idx / C;
    const int c = (int)(idx % C);
    atomicAdd(&dwte[(long long)inp[row] * C + c], dout[idx]);
}
