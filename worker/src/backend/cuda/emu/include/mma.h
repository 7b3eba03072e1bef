// What `#include <mma.h>` finds when the kernels are compiled for the emulated device: the warp
// matrix functions of the CUDA C++ Programming Guide ("Warp Matrix Functions", nvcuda::wmma),
// exactly the part the kernels use — m16n16k16 tiles, bf16 `matrix_a` / `matrix_b` fragments in
// either layout, f32 accumulators — with the guide's semantics:
//
// - load_matrix_sync / store_matrix_sync move a 16×16 tile between memory and a fragment:
//   element (r, c) of the tile is at mptr[r·ldm + c] (row major) or mptr[c·ldm + r] (col major),
//   for matrix_a r, c = m, k; for matrix_b k, n; for the accumulator m, n. mptr must be 256-bit
//   (32-byte) aligned and ldm a multiple of 16 bytes (8 bf16 or 4 floats); every lane of the warp
//   must call with the same mptr, ldm and layout. Each is refused here (a trap naming the line).
// - mma_sync(d, a, b, c) is d = a·b + c over the whole warp. bf16 × bf16 products are exact in
//   f32 (8 + 8 significant bits), as on the tensor cores; they are added to c in k order with
//   f32 round-to-nearest at each step. The hardware adds the 16 products in its own order and
//   internal precision (not specified by NVIDIA), so its results may differ in the last bits.
// - Which lane holds which element of a fragment is unspecified by the guide ("subject to change
//   in future architectures"). The emulation uses a scrambled mapping unlike any hardware's (a
//   different fixed permutation of the 256 elements per fragment kind, 8 per lane), so a kernel
//   that assumes one — or that the accumulator and matrix_a mappings agree — fails here. A
//   kernel may learn the accumulator mapping portably by loading a tile of known values.
// - Every load, store and mma is warp-collective: all 32 lanes meet in the runtime
//   (ld_emu_warp_exchange, worker/src/backend/cuda/emu/runtime.rs), which refuses a call some
//   lanes skip (divergence), a warp with fewer than 32 threads, and lanes at different lines.
//   Like the hardware, a store is not a barrier: reading what other lanes stored needs
//   __syncwarp() first (without it, lanes read before others have written, in this order).
#pragma once
#include "cuda_emu.h"

extern "C" {
// Every lane of `mask` hands `bytes` (at most 64) from `mine`; returns the warp's copies, lane l's
// at l·bytes, valid until this warp's next exchange completes.
const void* ld_emu_warp_exchange(const void* mine, unsigned long bytes, unsigned int mask, const char* file, int line);
}

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

// Element e = r·16 + c of a 16×16 tile is element (p % 8) of lane (p / 8), p = (MUL·e + ADD) mod 256.
// MUL is odd, so this is a permutation; INV is MUL's inverse mod 256.
template <unsigned MUL, unsigned ADD>
struct ld_emu_mapping {
    static constexpr unsigned inverse() {
        unsigned inv = 1;
        while ((inv * MUL) % 256u != 1u) inv += 2;
        return inv;
    }
    static constexpr unsigned INV = inverse();
    static_assert(MUL % 2 == 1, "the mapping must be a permutation");
    // Lane and element index of tile element (r, c).
    static __forceinline__ void place(int r, int c, int& lane, int& i) {
        const unsigned p = (MUL * (unsigned)(r * 16 + c) + ADD) % 256u;
        lane = (int)(p / 8u);
        i = (int)(p % 8u);
    }
    // Tile element (r, c) held as element i of `lane`.
    static __forceinline__ void element(int lane, int i, int& r, int& c) {
        const unsigned e = (INV * ((unsigned)(lane * 8 + i) + 256u - ADD)) % 256u;
        r = (int)(e / 16u);
        c = (int)(e % 16u);
    }
};
typedef ld_emu_mapping<167, 91> ld_emu_map_a;
typedef ld_emu_mapping<45, 13> ld_emu_map_b;
typedef ld_emu_mapping<109, 57> ld_emu_map_acc;

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(sizeof(T) == 0, "the emulation provides only m16n16k16 bf16 matrix_a/matrix_b and float accumulator fragments");
};
template <typename Layout>
struct fragment<matrix_a, 16, 16, 16, __nv_bfloat16, Layout> {
    typedef __nv_bfloat16 element_type;
    typedef ld_emu_map_a ld_emu_map;
    enum { num_elements = 8 };
    __nv_bfloat16 x[8];
};
template <typename Layout>
struct fragment<matrix_b, 16, 16, 16, __nv_bfloat16, Layout> {
    typedef __nv_bfloat16 element_type;
    typedef ld_emu_map_b ld_emu_map;
    enum { num_elements = 8 };
    __nv_bfloat16 x[8];
};
template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
    typedef float element_type;
    typedef ld_emu_map_acc ld_emu_map;
    enum { num_elements = 8 };
    float x[8];
};

static __forceinline__ int ld_emu_lane() { return (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32u); }

// The arguments every lane must agree on; exchanged, then compared with lane 0's.
struct ld_emu_ldst_args {
    const void* mptr;
    unsigned ldm;
    int layout;
};

static __forceinline__ void ld_emu_check_ldst(const char* what, const void* mptr, unsigned ldm, int layout, unsigned elem_bytes, const char* file, int line) {
    const ld_emu_ldst_args mine = {mptr, ldm, layout};
    const ld_emu_ldst_args* all = (const ld_emu_ldst_args*)ld_emu_warp_exchange(&mine, sizeof mine, 0xffffffffu, file, line);
    for (int l = 0; l < 32; l++) {
        if (all[l].mptr != all[0].mptr || all[l].ldm != all[0].ldm || all[l].layout != all[0].layout) {
            ld_emu_trap(what[0] == 'l' ? "wmma::load_matrix_sync called with different mptr, ldm or layout by the lanes of one warp"
                                       : "wmma::store_matrix_sync called with different mptr, ldm or layout by the lanes of one warp",
                        file, line);
            return;
        }
    }
    if (((unsigned long long)mptr) % 32u != 0) {
        ld_emu_trap(what[0] == 'l' ? "wmma::load_matrix_sync: mptr is not 256-bit (32-byte) aligned" : "wmma::store_matrix_sync: mptr is not 256-bit (32-byte) aligned", file, line);
        return;
    }
    if ((ldm * elem_bytes) % 16u != 0) {
        ld_emu_trap(what[0] == 'l' ? "wmma::load_matrix_sync: ldm is not a multiple of 16 bytes (8 bf16, 4 float)" : "wmma::store_matrix_sync: ldm is not a multiple of 16 bytes (4 float)", file, line);
    }
}

template <typename Frag, typename T>
static __forceinline__ void ld_emu_load(Frag& f, const T* p, unsigned ldm, bool col, const char* file, int line) {
    ld_emu_check_ldst("load", p, ldm, col ? 1 : 0, sizeof(T), file, line);
    const int lane = ld_emu_lane();
    for (int i = 0; i < 8; i++) {
        int r, c;
        Frag::ld_emu_map::element(lane, i, r, c);
        f.x[i] = col ? p[(long long)c * ldm + r] : p[(long long)r * ldm + c];
    }
}

template <typename Layout>
static __forceinline__ bool ld_emu_is_col() {
    return false;
}
template <>
__forceinline__ bool ld_emu_is_col<col_major>() {
    return true;
}

template <typename Use, typename Layout>
static __forceinline__ void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* mptr, unsigned ldm, LD_EMU_HERE) {
    ld_emu_load(f, mptr, ldm, ld_emu_is_col<Layout>(), ld_file, ld_line);
}

static __forceinline__ void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* mptr, unsigned ldm, layout_t layout, LD_EMU_HERE) {
    ld_emu_load(f, mptr, ldm, layout == mem_col_major, ld_file, ld_line);
}

static __forceinline__ void store_matrix_sync(float* mptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout, LD_EMU_HERE) {
    const bool col = layout == mem_col_major;
    ld_emu_check_ldst("store", mptr, ldm, col ? 1 : 0, 4, ld_file, ld_line);
    const int lane = ld_emu_lane();
    for (int i = 0; i < 8; i++) {
        int r, c;
        ld_emu_map_acc::element(lane, i, r, c);
        if (col) {
            mptr[(long long)c * ldm + r] = f.x[i];
        } else {
            mptr[(long long)r * ldm + c] = f.x[i];
        }
    }
}

template <typename Use, typename T, typename Layout>
static __forceinline__ void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
    for (int i = 0; i < 8; i++) f.x[i] = v;
}

// What each lane hands the others for one mma: its elements of a and b.
struct ld_emu_mma_args {
    __nv_bfloat16 a[8];
    __nv_bfloat16 b[8];
};

template <typename LayoutA, typename LayoutB>
static __forceinline__ void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
                                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
                                     LD_EMU_HERE) {
    ld_emu_mma_args mine;
    for (int i = 0; i < 8; i++) {
        mine.a[i] = a.x[i];
        mine.b[i] = b.x[i];
    }
    const ld_emu_mma_args* all = (const ld_emu_mma_args*)ld_emu_warp_exchange(&mine, sizeof mine, 0xffffffffu, ld_file, ld_line);
    const int lane = ld_emu_lane();
    float out[8];
    for (int i = 0; i < 8; i++) {
        int m, n;
        ld_emu_map_acc::element(lane, i, m, n);
        float acc = c.x[i];
        for (int k = 0; k < 16; k++) {
            int la, ia, lb, ib;
            ld_emu_map_a::place(m, k, la, ia);
            ld_emu_map_b::place(k, n, lb, ib);
            acc = acc + __bfloat162float(all[la].a[ia]) * __bfloat162float(all[lb].b[ib]);
        }
        out[i] = acc;
    }
    // d may be c (the usual in-place accumulation): written only after every c element is read.
    for (int i = 0; i < 8; i++) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
