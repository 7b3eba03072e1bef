#!/usr/bin/env bash
# The one script to run on the GPU machine (see docs/CUDA.md): the CUDA selftest (every kernel
# and a training step against the CPU backend, NCCL world size 1) and the GPT-2 124M training
# benchmark (tokens/s, MFU). Results go under $OUT; the exit status is the selftest's.
#
# Build here first (`cargo build --release`), copy target/release/liandan to .gpu/liandan (a
# folder listed in .git/info/exclude) and carry .gpu to the GPU machine; or set LIANDAN_BIN.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BIN="${LIANDAN_BIN:-$PWD/.gpu/liandan}"
log() { echo "$*" | tee -a "$OUT/summary.txt"; }

# cudarc dlopens bare names: libnccl.so (the wheel ships libnccl.so.2), libnvrtc.so.13,
# libcublasLt.so.13. A folder of links for NCCL, then the toolkit's and the wheels' lib folders.
links="$(mktemp -d)"
nccl_dir="$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)"
if [ -n "$nccl_dir" ] && [ -f "$nccl_dir/lib/libnccl.so.2" ]; then
    ln -sf "$nccl_dir/lib/libnccl.so.2" "$links/libnccl.so"
else
    log "warning: nvidia-nccl wheel not found; the NCCL check will fail"
fi
cu13_dir="$(python3 -c 'import nvidia, os; print([p for p in nvidia.__path__][0] + "/cu13")' 2>/dev/null || true)"
libpath="$links"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 "$cu13_dir/lib"; do
    [ -d "$d" ] && libpath="$libpath:$d"
done
export LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LIANDAN_KERNEL_CACHE="${LIANDAN_KERNEL_CACHE:-$(mktemp -d)}"
export RUST_LOG="${RUST_LOG:-info}"

log "binary: $BIN"
log "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
nvcc --version > "$OUT/nvcc.txt" 2>&1 || true

start=$(date +%s)
timeout 300 "$BIN" selftest --device cuda > "$OUT/selftest.txt" 2>&1
selftest_rc=$?
log "selftest: rc=$selftest_rc in $(( $(date +%s) - start )) s; $(grep -c '^FAIL' "$OUT/selftest.txt") FAIL lines"
tail -n 1 "$OUT/selftest.txt" | tee -a "$OUT/summary.txt"

start=$(date +%s)
timeout 240 "$BIN" bench train --device cuda --model gpt2-124m --batch 8 --seq 1024 --steps 10 --warmup 2 > "$OUT/bench_bf16.txt" 2>&1
log "bench bf16: rc=$? in $(( $(date +%s) - start )) s"
grep -E '^(tokens/s|bench_result)' "$OUT/bench_bf16.txt" | tee -a "$OUT/summary.txt"

exit "$selftest_rc"
