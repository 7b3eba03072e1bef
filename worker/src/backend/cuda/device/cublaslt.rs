//! cuBLASLt on the GPU: one handle and one workspace (sized once), and a plan per shape — the
//! matmul descriptor with its transposes and epilogue, the four matrix layouts, and the
//! algorithm the heuristic chose — built the first time a shape is seen and reused after, so a
//! training step's ~150 gemms (a few dozen distinct shapes) do not rebuild descriptors or rerun
//! the heuristic.
//!
//! The key includes each pointer's alignment (up to 256 bytes), handed to the heuristic as the
//! `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES` preferences: by default cuBLASLt assumes 256-byte
//! aligned matrices and may pick an algorithm that needs it, while views into the model's buffers
//! start wherever a layer's slot does. The epilogue (bias, GELU with its aux matrix, or GELU's
//! derivative) is part of the key with its leading dimension and pointer alignments; per call,
//! only the bias and aux pointers are set on the plan's descriptor.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::blas::{DataType, Epilogue, Matmul, MatrixLayout};
use crate::backend::cuda::error::{CudaError, Result};

/// What a plan is for: everything that changes the descriptors or the chosen algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    trans_a: bool,
    trans_b: bool,
    layouts: [MatrixLayout; 4],
    /// Alignment of A, B, C and D in bytes (the largest power of two dividing the address, at
    /// most 256).
    align: [u32; 4],
    epilogue: EpilogueKind,
}

/// The epilogue without its per-call pointers: what the plan's descriptor and algorithm depend on
/// (the aux matrix's leading dimension, and the alignment of the bias and aux pointers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EpilogueKind {
    Default,
    Bias { align: u32 },
    GeluAuxBias { align: u32, aux_align: u32, aux_ld: i64 },
    DGelu { aux_align: u32, aux_ld: i64 },
    BGradA { align: u32 },
}

impl EpilogueKind {
    fn of(e: &Epilogue) -> Self {
        match *e {
            Epilogue::Default => EpilogueKind::Default,
            Epilogue::Bias(b) => EpilogueKind::Bias { align: alignment(b.0) },
            Epilogue::GeluAuxBias { bias, aux, aux_ld } => EpilogueKind::GeluAuxBias { align: alignment(bias.0), aux_align: alignment(aux.0), aux_ld },
            Epilogue::DGelu { aux, aux_ld } => EpilogueKind::DGelu { aux_align: alignment(aux.0), aux_ld },
            Epilogue::BGradA(b) => EpilogueKind::BGradA { align: alignment(b.0) },
        }
    }

    /// `cublasLtEpilogue_t` and the aux leading dimension to set on the descriptor.
    fn descriptor(&self) -> (ltsys::cublasLtEpilogue_t, Option<i64>) {
        use ltsys::cublasLtEpilogue_t as E;
        match *self {
            EpilogueKind::Default => (E::CUBLASLT_EPILOGUE_DEFAULT, None),
            EpilogueKind::Bias { .. } => (E::CUBLASLT_EPILOGUE_BIAS, None),
            EpilogueKind::GeluAuxBias { aux_ld, .. } => (E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS, Some(aux_ld)),
            EpilogueKind::DGelu { aux_ld, .. } => (E::CUBLASLT_EPILOGUE_DGELU, Some(aux_ld)),
            EpilogueKind::BGradA { .. } => (E::CUBLASLT_EPILOGUE_BGRADA, None),
        }
    }
}

/// Descriptors and the algorithm of one shape.
struct Plan {
    desc: Desc,
    layouts: [Layout; 4],
    algo: ltsys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle with its workspace and plans, bound to one stream.
pub(super) struct Blas {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the handle and descriptors are used only through &self methods that enqueue on the one
// stream, with the plans behind a mutex held for the whole call; cuBLASLt handles may be used
// from any thread as long as calls are not concurrent. The host code drives a device from one
// thread at a time (the trainer and model take `&mut self`).
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

fn alignment(p: u64) -> u32 {
    if p == 0 { 256 } else { 1u32 << p.trailing_zeros().min(8) }
}

impl Blas {
    /// A handle and a workspace sized as NVIDIA recommends (32 MiB on Hopper, 4 MiB before).
    pub(super) fn new(stream: Arc<CudaStream>, sm_major: i32) -> Result<Blas> {
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        let size = if sm_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream.alloc_zeros::<u8>(size).map_err(CudaError::driver("allocate cuBLASLt workspace"))?;
        let workspace_ptr = workspace.device_ptr(&stream).0;
        Ok(Blas { handle, workspace, workspace_ptr, stream, plans: Mutex::new(HashMap::new()) })
    }

    fn plan(&self, key: &PlanKey, epilogue: &Epilogue, op: &dyn Fn() -> String) -> Result<Plan> {
        let layouts = [Layout::new(&key.layouts[0]), Layout::new(&key.layouts[1]), Layout::new(&key.layouts[2]), Layout::new(&key.layouts[3])];
        let [a, b, c, d] = layouts;
        let layouts = [a.map_err(|e| blas_err(&op(), e))?, b.map_err(|e| blas_err(&op(), e))?, c.map_err(|e| blas_err(&op(), e))?, d.map_err(|e| blas_err(&op(), e))?];
        let desc = Desc::new().map_err(|e| blas_err(&op(), e))?;
        desc.set_i32(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, key.trans_a as i32).map_err(|e| blas_err(&op(), e))?;
        desc.set_i32(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, key.trans_b as i32).map_err(|e| blas_err(&op(), e))?;
        let (epi, aux_ld) = key.epilogue.descriptor();
        if key.epilogue != EpilogueKind::Default {
            desc.set_i32(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, epi as i32).map_err(|e| blas_err(&op(), e))?;
        }
        if let Some(ld) = aux_ld {
            // SAFETY: the attribute takes an int64_t, passed by address with its size.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc.0,
                    ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    (&ld) as *const i64 as *const _,
                    std::mem::size_of::<i64>(),
                )
            }
            .map_err(|e| blas_err(&op(), e))?;
        }
        // The heuristic reads the epilogue pointers' alignment from the descriptor, so the plan
        // is built with this call's pointers set (a later call with the same key has the same
        // alignments and sets its own).
        set_epilogue_pointers(&desc, epilogue, op)?;
        let pref = Pref::new(self.workspace.len(), key.align).map_err(|e| blas_err(&op(), e))?;
        // SAFETY: the descriptors are alive for the call.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, layouts[0].0, layouts[1].0, layouts[2].0, layouts[3].0, pref.0) }.map_err(|e| blas_err(&op(), e))?;
        Ok(Plan { desc, layouts, algo: heuristic.algo })
    }

    pub(super) fn matmul(&self, mm: &Matmul) -> Result<()> {
        let (m, n, k) = mm.dims();
        let op = || format!("matmul m={m} n={n} k={k} transa={} transb={} epilogue={:?}", mm.trans_a, mm.trans_b, mm.epilogue);
        let key = PlanKey {
            trans_a: mm.trans_a,
            trans_b: mm.trans_b,
            layouts: [mm.a_layout, mm.b_layout, mm.c_layout, mm.d_layout],
            align: [alignment(mm.a.0), alignment(mm.b.0), alignment(mm.c.0), alignment(mm.d.0)],
            epilogue: EpilogueKind::of(&mm.epilogue),
        };
        let mut plans = self.plans.lock().map_err(|_| CudaError::Blas { op: op(), status: "plan cache poisoned".into() })?;
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.plan(&key, &mm.epilogue, &op)?),
        };
        set_epilogue_pointers(&plan.desc, &mm.epilogue, &op)?;
        // SAFETY: the plan's descriptors are alive (owned by the cache, locked); the pointers
        // come from buffers whose lengths the callers checked against these shapes.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc.0,
                (&mm.alpha) as *const f32 as *const _,
                (&mm.beta) as *const f32 as *const _,
                mm.a.0 as *const _,
                plan.layouts[0].0,
                mm.b.0 as *const _,
                plan.layouts[1].0,
                mm.c.0 as *const _,
                plan.layouts[2].0,
                mm.d.0 as *mut _,
                plan.layouts[3].0,
                &plan.algo,
                self.workspace_ptr as *mut _,
                self.workspace.len(),
                self.stream.cu_stream() as *mut _,
            )
            .map_err(|e| blas_err(&op(), e))
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // The plans' descriptors first, then the handle.
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Sets this call's bias and aux pointers on a plan's descriptor (the epilogues that have them).
fn set_epilogue_pointers(desc: &Desc, epilogue: &Epilogue, op: &dyn Fn() -> String) -> Result<()> {
    use ltsys::cublasLtMatmulDescAttributes_t as A;
    let pointers = [(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, epilogue.bias()), (A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, epilogue.aux().map(|a| a.0))];
    for (attr, ptr) in pointers {
        let Some(ptr) = ptr else { continue };
        let p: u64 = ptr.0;
        // SAFETY: the attribute takes a device pointer, passed by address with its size.
        unsafe { lt::set_matmul_desc_attribute(desc.0, attr, (&p) as *const u64 as *const _, std::mem::size_of::<u64>()) }.map_err(|e| blas_err(&op(), e))?;
    }
    Ok(())
}

fn blas_err(op: &str, e: lt::CublasError) -> CudaError {
    CudaError::Blas { op: op.to_string(), status: format!("{:?}", e.0) }
}

fn data_type(dt: DataType) -> ltsys::cudaDataType {
    match dt {
        DataType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DataType::Bf16 => ltsys::cudaDataType::CUDA_R_16BF,
    }
}

/// Owned descriptors, destroyed on every path (errors included).
struct Layout(ltsys::cublasLtMatrixLayout_t);
impl Layout {
    fn new(l: &MatrixLayout) -> Result<Layout, lt::CublasError> {
        lt::create_matrix_layout(data_type(l.dtype), l.rows, l.cols, l.ld).map(Layout)
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(ltsys::cublasLtMatmulDesc_t);
impl Desc {
    fn new() -> Result<Desc, lt::CublasError> {
        lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, ltsys::cudaDataType::CUDA_R_32F).map(Desc)
    }
    /// An attribute that takes an i32: a `cublasOperation_t` (0 = N, 1 = T) or a `cublasLtEpilogue_t`.
    fn set_i32(&self, attr: ltsys::cublasLtMatmulDescAttributes_t, v: i32) -> Result<(), lt::CublasError> {
        // SAFETY: the attribute takes a 32-bit enum, passed by address with its size.
        unsafe { lt::set_matmul_desc_attribute(self.0, attr, (&v) as *const i32 as *const _, std::mem::size_of::<i32>()) }
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(ltsys::cublasLtMatmulPreference_t);
impl Pref {
    fn new(workspace: usize, align: [u32; 4]) -> Result<Pref, lt::CublasError> {
        use ltsys::cublasLtMatmulPreferenceAttributes_t as A;
        let p = Pref(lt::create_matmul_pref()?);
        // SAFETY: each attribute takes the type it is given here (size_t, uint32_t), by address
        // with its size.
        unsafe {
            lt::set_matmul_pref_attribute(p.0, A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&workspace) as *const usize as *const _, std::mem::size_of::<usize>())?;
            let attrs = [
                A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, bytes) in attrs.into_iter().zip(align) {
                lt::set_matmul_pref_attribute(p.0, attr, (&bytes) as *const u32 as *const _, std::mem::size_of::<u32>())?;
            }
        }
        Ok(p)
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0x1002), 2);
    }
}
