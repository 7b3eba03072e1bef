//! Compute backends. `cpu` is the reference for every op and the backend CI runs; a CUDA backend
//! built on the same op list follows, each kernel checked against its CPU counterpart here.

pub mod cpu;
