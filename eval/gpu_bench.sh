#!/usr/bin/env bash
# One call on a GPU machine: FLUX.1-dev geometry (19 double + 38 single blocks, 3072 wide, 4096 image +
# 512 text tokens) with random weights in bf16, and OpenSora 1.2 (STDiT3-XL, 51 frames), uncached against
# FORA, ToCa (the preset), a forecast (its cache also in float8 and offloaded), the preset with and without its
# budget, and diffusers' caches; eager and compiled; the Triton kernels off
# and on. Every table is appended to $OUT/gpu_bench.md (default: runs/) with the device named; copy the
# tables into eval/BENCHMARKS.md. Meant to fit one 8-minute call on an H200 (an estimate: not run on a GPU yet).
#
#   bash eval/gpu_bench.sh                  # the real sizes (needs CUDA)
#   DRY_RUN=1 bash eval/gpu_bench.sh        # the same runs at tiny width on the CPU (what the test runs)
set -euo pipefail
out="${OUT:-runs}"
mkdir -p "$out"
report="$out/gpu_bench.md"

if [ "${DRY_RUN:-0}" = "1" ]; then
    device=cpu dtype=float32
    flux=(--model flux --width tiny --layers 1 --single-layers 1 --size 8 --text-tokens 8)
    video=(--model opensora --width tiny --layers 1 --size 8 --frames 9 --text-tokens 8)
    long=4 short=3 video_steps=3
else
    device=cuda dtype=bfloat16
    flux=(--model flux --width flux --layers 19 --single-layers 38 --size 128 --text-tokens 512)
    video=(--model opensora --width xl --layers 28 --size 60x106 --frames 51 --text-tokens 300)
    long=50 short=28 video_steps=30
fi
common=(--device "$device" --dtype "$dtype" --repeats 1 --warmup 1 --quiet)
methods=(uncached fora:4 toca:4:0.9:auto:auto fora:4:order=1 fbc:0.1 taylorseer:4 magcache)

bench() {  # a title, then the arguments of `ditcache bench`
    local title="$1"
    shift
    echo "+ $title" >&2
    {
        echo "## $title"
        echo
        echo '```'
        python -m ditcache.eval.speed "$@"
        echo '```'
        echo
    } >>"$report"
}

echo "# GPU benchmark, $(date -u +%Y-%m-%d)" >"$report"
if [ "$device" = cuda ]; then  # the tests that need CUDA (CI has none): Triton kernels, offloading with streams
    { echo '## Tests that need CUDA'; echo; echo '```'; python -m pytest -q tests/test_kernels.py tests/test_stack.py tests/test_budget.py -k 'kernels or offloading or offloaded' 2>&1 | tail -3; echo '```'; echo; } >>"$report"
fi
bench "FLUX.1-dev geometry, $long steps, eager" "${flux[@]}" --steps "$long" --methods "${methods[@]}" "${common[@]}"
DITCACHE_TRITON=1 bench "FLUX.1-dev geometry, $long steps, eager, Triton kernels on" \
    "${flux[@]}" --steps "$long" --methods uncached toca:4:0.9:auto:auto "${common[@]}"
bench "FLUX.1-dev geometry, $short steps, eager, the cache in float8 and offloaded to pinned host memory (time and memory against the model's precision)" \
    "${flux[@]}" --steps "$short" --methods uncached fora:4:order=1 fora:4:order=1:store=float8 fora:4:order=1:offload=1 \
    ditcache ditcache:memory=none ditcache:layout=chain "${common[@]}"
bench "FLUX.1-dev geometry, $short steps, compiled blocks" \
    "${flux[@]}" --steps "$short" --methods uncached fora:4 toca:4:0.9:auto:auto --compile "${common[@]}"
bench "OpenSora 1.2 (STDiT3-XL), $video_steps steps, eager" \
    "${video[@]}" --steps "$video_steps" --methods uncached fora:3 toca:3:0.9:auto:auto "${common[@]}"
echo "tables in $report" >&2
