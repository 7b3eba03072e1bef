#!/usr/bin/env bash
# The GPU check (docs/CUDA.md). Two steps:
#
#   bash scripts/gpu_check.sh --build   # on the build machine: release build, stripped to
#                                       # .gpu/liandan (must stay under 64 MiB), plus this script
#   bash scripts/gpu_check.sh           # on the GPU machine, with .gpu/ carried there
#
# On the GPU it runs, each section under its own timeout, every section even when one fails:
#   1. the selftest, one process per section (a CUDA error is sticky for its process, so a crash
#      in one section cannot hide the others), full shapes;
#   2. the selftest at small shapes under compute-sanitizer memcheck and racecheck, when present;
#   3. the GPT-2 124M training benchmark (tokens/s, MFU) with a per-op time table;
#   4. NCCL last (world size 1), under a short timeout with NCCL_DEBUG=WARN.
#   5. opt-in (JOB_CHECK=1): the demo job on one CUDA worker and on one CPU worker, tables side by side.
# LIANDAN_DEVICE=cuda-emu runs the same script on the emulated device (a dry run of the script
# on a machine without a GPU; give it BENCH_ARGS="--model nano --batch 2 --seq 64").
# Results go under $OUT (default ./gpu-out): one log per section and summary.txt, which ends
# with one line per section. The exit status is 1 when any section failed. The timeouts add up
# are bounded by a budget (GPU_CHECK_BUDGET, default 420 s) so a second run fits in the lease.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ "${1:-}" = "--build" ]; then
    set -e
    cargo build --release -p liandan-cli
    mkdir -p .gpu
    strip -o .gpu/liandan target/release/liandan
    cp scripts/gpu_check.sh .gpu/gpu_check.sh
    bytes=$(stat -c %s .gpu/liandan)
    echo ".gpu/liandan: $((bytes / 1048576)) MiB stripped"
    if [ "$bytes" -ge $((64 * 1048576)) ]; then
        echo "error: the stripped binary is over 64 MiB" >&2
        exit 1
    fi
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '.gpu/' "$exclude" 2>/dev/null || echo '.gpu/' >> "$exclude"
    exit 0
fi

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BIN="${LIANDAN_BIN:-$PWD/.gpu/liandan}"
DEVICE="${LIANDAN_DEVICE:-cuda}"
read -r -a bench_args <<< "${BENCH_ARGS:---model gpt2-124m --batch 8 --seq 1024}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
log() { echo "$*" | tee -a "$SUMMARY"; }
results=()
failed=0

# The whole run's budget in seconds: a section that would end past it is skipped (and counts
# as failed), so one run cannot eat the time of its rerun. NCCL keeps its own 45 s after it.
BUDGET="${GPU_CHECK_BUDGET:-420}"
NCCL_SECS=45
t_start=$(date +%s)

# Runs one section: NAME SECONDS COMMAND...; its output goes to $OUT/NAME.txt.
section() {
    local name="$1" secs="$2"
    shift 2
    local start rc verdict reserve=$NCCL_SECS
    start=$(date +%s)
    [ "$name" = selftest-nccl ] && reserve=0
    if [ $((start - t_start + secs + reserve)) -gt "$BUDGET" ]; then
        results+=("$(printf '%-34s %-22s' "$name" "SKIPPED (budget)")")
        log "$name: skipped, it could end past the ${BUDGET} s budget"
        failed=1
        return
    fi
    timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        verdict=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMEOUT after ${secs} s"
        failed=1
    else
        verdict="FAILED (rc $rc)"
        failed=1
    fi
    results+=("$(printf '%-34s %-22s %4d s  %s' "$name" "$verdict" "$(($(date +%s) - start))" "$(grep -E '^(selftest|section|tokens/s|error)' "$OUT/$name.txt" | tail -n 1)")")
    log "$name: $verdict in $(($(date +%s) - start)) s"
}

if [ ! -x "$BIN" ]; then
    log "error: no binary at $BIN (run 'bash scripts/gpu_check.sh --build' on the build machine, or set LIANDAN_BIN)"
    exit 1
fi

# Libraries. cudarc dlopens bare names (libcuda.so, libnvrtc.so.13, libcublasLt.so.13,
# libnccl.so): the toolkit's lib64, every lib folder of NVIDIA's Python wheels, and a folder of
# links for NCCL, whose wheel ships only libnccl.so.2.
links="$(mktemp -d)"
libpath="$links"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && libpath="$libpath:$d"
done
nvidia_dirs="$(python3 -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null || true)"
site_dirs="$(python3 -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))' 2>/dev/null || true)"
while IFS= read -r d; do
    if [ -z "$d" ] || [ ! -d "$d" ]; then continue; fi
    while IFS= read -r lib; do
        libpath="$libpath:$lib"
    done < <(find "$d" -maxdepth 3 -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u)
done <<< "$nvidia_dirs"
nccl=""
while IFS= read -r d; do
    if [ -z "$d" ] || [ ! -d "$d" ]; then continue; fi
    nccl="$(find "$d" -maxdepth 5 -name 'libnccl.so.2' 2>/dev/null | head -n 1)"
    [ -n "$nccl" ] && break
done <<< "$(printf '%s\n%s\n' "$nvidia_dirs" "$site_dirs")"
if [ -z "$nccl" ]; then
    nccl="$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 / {print $NF; exit}')"
fi
if [ -n "$nccl" ]; then
    ln -sf "$nccl" "$links/libnccl.so"
    log "NCCL: $nccl"
else
    log "warning: libnccl.so.2 not found (nvidia-nccl wheel or system); the nccl section will fail"
fi
export LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -z "${LIANDAN_CUDA_INCLUDE:-}" ]; then
    for d in /usr/local/cuda/include /usr/local/cuda-13.0/include; do
        if [ -f "$d/cuda_bf16.h" ] && [ -f "$d/crt/mma.h" ]; then
            export LIANDAN_CUDA_INCLUDE="$d"
            break
        fi
    done
fi
export LIANDAN_KERNEL_CACHE="${LIANDAN_KERNEL_CACHE:-$OUT/kernel-cache}"
export RUST_LOG="${RUST_LOG:-info}"

log "binary: $BIN ($(stat -c %s "$BIN") bytes)"
log "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
log "CUDA headers: ${LIANDAN_CUDA_INCLUDE:-(searched by liandan)}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
nvcc --version > "$OUT/nvcc.txt" 2>&1 || true

# 1. The selftest, one section per process (the first compiles the kernels into the cache).
mapfile -t sections < <("$BIN" selftest --list 2>/dev/null)
if [ "${#sections[@]}" -eq 0 ]; then
    log "error: '$BIN selftest --list' printed no sections"
    sections=(encoder)
fi
for s in "${sections[@]}"; do
    [ "$s" = nccl ] && continue
    secs=25
    [ "$s" = encoder ] && secs=90 # includes NVRTC compiling every kernel file
    section "selftest-$s" "$secs" "$BIN" selftest --device "$DEVICE" --shapes full --section "$s"
done

# 2. compute-sanitizer on the kernel sections at small shapes.
sanitizer="$(command -v compute-sanitizer || true)"
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
if [ -n "$sanitizer" ]; then
    kernel_sections="encoder,layernorm,gelu_residual,cast_bf16,matmul,lm_head,attention,flash_attention,kv_cache,rmsnorm,rope,swiglu,embedding,gqa_attention,crossentropy,scalar_head,optimizer"
    section "sanitizer-memcheck" 75 "$sanitizer" --tool memcheck --error-exitcode 3 "$BIN" selftest --device "$DEVICE" --shapes small --section "$kernel_sections"
    section "sanitizer-racecheck" 75 "$sanitizer" --tool racecheck --error-exitcode 3 "$BIN" selftest --device "$DEVICE" --shapes small --section "$kernel_sections"
else
    log "compute-sanitizer not found: skipped"
fi

# 3. GPT-2 124M: throughput and MFU, then the same steps with a time per op.
section "bench-train-bf16" 120 "$BIN" bench train --device "$DEVICE" --precision bf16 "${bench_args[@]}" --steps 5 --warmup 2 --profile
grep -E '^(tokens/s|bench_result)' "$OUT/bench-train-bf16.txt" | tee -a "$SUMMARY"
sed -n '/^per-op time/,/^(other)/p' "$OUT/bench-train-bf16.txt" | tee -a "$SUMMARY"
# The same on the f32 reference attention kernels: the per-op table before the tensor-core ones.
section "bench-train-bf16-reference-attention" 90 "$BIN" bench train --device "$DEVICE" --precision bf16 "${bench_args[@]}" --steps 3 --warmup 1 --profile --attention reference
grep -E '^(tokens/s|bench_result)' "$OUT/bench-train-bf16-reference-attention.txt" | tee -a "$SUMMARY"
grep -E 'attention' "$OUT/bench-train-bf16-reference-attention.txt" | tee -a "$SUMMARY"

# 4. NCCL last: it is the most likely to hang, and its own timeout bounds that.
export NCCL_DEBUG=WARN
section "selftest-nccl" "$NCCL_SECS" "$BIN" selftest --device "$DEVICE" --section nccl

# 5. Opt-in (JOB_CHECK=1, with GPU_CHECK_BUDGET raised to fit): the demo job, pretrain → SFT →
#    reward → PPO, on one CUDA worker and on one CPU worker, shortened pretrain and SFT, with the
#    two tables side by side. The phases are the same code on both (the engine interface).
if [ "${JOB_CHECK:-0}" = 1 ]; then
    JOB_STEPS="${JOB_STEPS:-200}"
    section "job-cuda" 300 "$BIN" up --device "$DEVICE" --workers 1 --steps "$JOB_STEPS" --out "$OUT/job-cuda"
    section "job-cpu" 300 "$BIN" up --device cpu --workers 1 --steps "$JOB_STEPS" --out "$OUT/job-cpu"
    for j in job-cuda job-cpu; do
        log "--- $j"
        grep -E '^(pretrain|sft|reward|ppo|\||- )' "$OUT/$j.txt" | tee -a "$SUMMARY"
    done
fi

log ""
log "section                            verdict                time  last line"
for r in "${results[@]}"; do
    log "$r"
done
exit "$failed"
