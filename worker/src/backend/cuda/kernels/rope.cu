// Rotary position embeddings in Hugging Face's rotate_half convention (Llama, Qwen2): in each
// head of size hs, channel i < hs/2 pairs with i + hs/2, and position p rotates the pair by
// p·θ^(-2i/hs). The cos/sin table is the CPU's (backend::cpu::rope::RopeTable, built on the
// host from the config's θ and uploaded): (maxT, hs/2) each, row p holding position p, so the
// GPU rotates by exactly the angles the CPU does.
//
// The rotation is orthogonal: the backward is the rotation by the opposite angle, in place on
// the gradient, and nothing is saved for it.

// CPU reference: backend::cpu::rope::rope_apply
// Rotates heads 0..heads of width 2·half starting at column col0 of each of `rows` rows of x
// (row stride `stride` floats; row r is at position pos0 + r % T), in place:
// x'[i] = x[i]·cos − x[i+half]·s, x'[i+half] = x[i+half]·cos + x[i]·s with s = ±sin (−sin when
// `inverse`, the backward). One thread per (row, head, i < half) pair.
extern "C" __global__ void rope_apply(float* x, const float* cos_table, const float* sin_table, int rows, int T, int stride,
                                      int col0, int heads, int half, int pos0, int inverse) {
    const long long idx = global_index();
    if (idx >= (long long)rows * heads * half) return;
    const int i = (int)(idx % half);
    const long long rh = idx / half;
    const int h = (int)(rh % heads);
    const long long r = rh / heads;
    const long long p = pos0 + r % T;
    const float c = cos_table[p * half + i];
    const float s = inverse ? -sin_table[p * half + i] : sin_table[p * half + i];
    float* head = x + r * stride + col0 + (long long)h * 2 * half;
    const float x1 = head[i], x2 = head[i + half];
    head[i] = x1 * c - x2 * s;
    head[i + half] = x2 * c + x1 * s;
}
