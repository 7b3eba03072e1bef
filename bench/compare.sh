#!/usr/bin/env bash
# Side-by-side CPU training throughput: liandan vs eager PyTorch.
#
# Usage: bench/compare.sh [PRESET...]        (default: tiny small-256)
#
# For each preset it runs
#   $LIANDAN bench train --device cpu --model PRESET --batch B --threads N --steps S --warmup 2
#   python3 bench/torch_gpt.py     --model PRESET --batch B --threads N --steps S --warmup 2
# and for the llama-family preset qwen2.5-0.5b (both with --seq T)
#   python3 bench/torch_llama.py   --model PRESET --batch B --seq T --threads N --steps S --warmup 2
# takes the last `bench_result ...` line each prints, and prints a table of
# tokens/s and the liandan/pytorch ratio. The runs' own output goes to stderr.
#
# Environment:
#   LIANDAN  liandan binary (default: <repo>/target/release/liandan)
#   PYTHON   python interpreter (default: python3)
#   BATCH    batch size (default 4)
#   THREADS  CPU threads for both (default 2)
#   STEPS    timed steps (default 10)
#   SEQ      tokens per sequence for qwen2.5-0.5b (default 256; the GPT-2 presets use their context)
#
# The functions can be sourced without running anything (`source bench/compare.sh`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

# field LINE KEY -> prints the value of KEY=VALUE in a bench_result line.
field() {
    local key="$2" word
    local -a words
    read -r -a words <<<"$1"
    for word in "${words[@]}"; do
        if [[ "$word" == "$key="* ]]; then
            printf '%s\n' "${word#"$key"=}"
            return 0
        fi
    done
    echo "compare.sh: no '$key=' in: $1" >&2
    return 1
}

# result_line IMPL PRESET -> reads a run's output on stdin, prints its last
# bench_result line after checking impl= and model=.
result_line() {
    local impl="$1" preset="$2" line
    line="$(grep '^bench_result ' | tail -n 1 || true)"
    if [[ -z "$line" ]]; then
        echo "compare.sh: $impl printed no bench_result line for $preset" >&2
        return 1
    fi
    if [[ "$(field "$line" impl)" != "$impl" || "$(field "$line" model)" != "$preset" ]]; then
        echo "compare.sh: unexpected result line from $impl for $preset: $line" >&2
        return 1
    fi
    printf '%s\n' "$line"
}

# show: copy stdin to stdout and to stderr, line by line (so progress is
# visible while the output is being captured; `tee /dev/stderr` would
# truncate stderr when it is redirected to a file).
show() {
    local l
    while IFS= read -r l || [[ -n "$l" ]]; do
        printf '%s\n' "$l" >&2
        printf '%s\n' "$l"
    done
}

# ratio A B -> A/B with two decimals ("n/a" when B is zero).
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b }'
}

print_header() {
    printf '%-12s %16s %16s %16s\n' preset "liandan tok/s" "pytorch tok/s" "liandan/pytorch"
}

# print_row PRESET LIANDAN_LINE PYTORCH_LINE
print_row() {
    local l p
    l="$(field "$2" tokens_per_s)"
    p="$(field "$3" tokens_per_s)"
    printf '%-12s %16s %16s %16s\n' "$1" "$l" "$p" "$(ratio "$l" "$p")"
}

main() {
    if [[ $# -eq 0 ]]; then
        set -- tiny small-256
    fi
    local liandan="${LIANDAN:-$root/target/release/liandan}"
    local python="${PYTHON:-python3}"
    local batch="${BATCH:-4}" threads="${THREADS:-2}" steps="${STEPS:-10}"
    if [[ ! -x "$liandan" ]]; then
        echo "compare.sh: $liandan is not an executable (build with cargo build --release, or set LIANDAN)" >&2
        exit 1
    fi

    local -a rows=()
    local preset out lline pline peer
    local -a seq
    for preset in "$@"; do
        peer=torch_gpt.py
        seq=()
        if [[ "$preset" == qwen2.5-0.5b ]]; then
            peer=torch_llama.py
            seq=(--seq "${SEQ:-256}")
        fi
        echo "== $preset: liandan" >&2
        out="$("$liandan" bench train --device cpu --model "$preset" --batch "$batch" "${seq[@]}" \
            --threads "$threads" --steps "$steps" --warmup 2 | show)" ||
            { echo "compare.sh: liandan failed for $preset" >&2; exit 1; }
        lline="$(result_line liandan "$preset" <<<"$out")"

        echo "== $preset: pytorch" >&2
        out="$("$python" "$here/$peer" --model "$preset" --batch "$batch" "${seq[@]}" \
            --threads "$threads" --steps "$steps" --warmup 2 | show)" ||
            { echo "compare.sh: $peer failed for $preset" >&2; exit 1; }
        pline="$(result_line pytorch "$preset" <<<"$out")"

        rows+=("$(print_row "$preset" "$lline" "$pline")")
    done

    echo
    echo "batch=$batch threads=$threads steps=$steps"
    print_header
    printf '%s\n' "${rows[@]}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
