//! The launch limits of an sm_90 GPU (H100, H200), which the emulated launcher enforces so a
//! launch the GPU would refuse is refused in CI too, with a message that names the limit.
//! Numbers: CUDA C Programming Guide, "Technical Specifications per Compute Capability" (9.0).

use crate::backend::cuda::device::LaunchConfig;

/// Threads per block.
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;
/// Block dimensions x, y, z.
pub const MAX_BLOCK_DIM: (u32, u32, u32) = (1024, 1024, 64);
/// Grid dimensions x, y, z.
pub const MAX_GRID_DIM: (u32, u32, u32) = (2_147_483_647, 65_535, 65_535);
/// Shared memory per block (static + dynamic) without the opt-in attribute.
pub const SHARED_DEFAULT: u32 = 48 << 10;
/// The most shared memory per block with `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`
/// (227 KiB on sm_90).
pub const SHARED_OPTIN_MAX: u32 = 232_448;

/// Checks `cfg` against the limits; `max_dynamic` is the kernel's dynamic shared memory
/// attribute ([`SHARED_DEFAULT`] unless the host raised it).
///
/// # Errors
/// The first limit the launch exceeds, with the numbers.
pub fn check(cfg: &LaunchConfig, max_dynamic: u32) -> Result<(), String> {
    let (bx, by, bz) = cfg.block_dim;
    let (gx, gy, gz) = cfg.grid_dim;
    if bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 {
        return Err(format!("grid {:?} × block {:?} has a zero dimension", cfg.grid_dim, cfg.block_dim));
    }
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads > MAX_THREADS_PER_BLOCK {
        return Err(format!("{threads} threads per block (block {:?}) exceed the device's {MAX_THREADS_PER_BLOCK}", cfg.block_dim));
    }
    for (axis, v, max) in [("x", bx, MAX_BLOCK_DIM.0), ("y", by, MAX_BLOCK_DIM.1), ("z", bz, MAX_BLOCK_DIM.2)] {
        if v > max {
            return Err(format!("block dimension {axis} = {v} exceeds the device's {max}"));
        }
    }
    for (axis, v, max) in [("x", gx, MAX_GRID_DIM.0), ("y", gy, MAX_GRID_DIM.1), ("z", gz, MAX_GRID_DIM.2)] {
        if v > max {
            return Err(format!("grid dimension {axis} = {v} exceeds the device's {max}"));
        }
    }
    if cfg.shared_mem_bytes > max_dynamic {
        let how = if max_dynamic <= SHARED_DEFAULT {
            format!(" (the default {SHARED_DEFAULT}; more needs set_max_dynamic_shared, up to {SHARED_OPTIN_MAX})")
        } else {
            " (the kernel's opt-in attribute)".to_string()
        };
        return Err(format!("{} bytes of dynamic shared memory exceed the kernel's limit of {max_dynamic}{how}", cfg.shared_mem_bytes));
    }
    Ok(())
}

/// Static + dynamic shared memory a block of a kernel with attribute `max_dynamic` may use.
pub fn shared_limit(max_dynamic: u32) -> usize {
    if max_dynamic > SHARED_DEFAULT { SHARED_OPTIN_MAX as usize } else { SHARED_DEFAULT as usize }
}
