#!/usr/bin/env bash
# GPU checks and benchmarks in one go (one CUDA device): device agreement with the CPU, then
# benchmarks 2 (reference, fast and compiled head), 3 (three backbones, JPEG decoding in the workers and
# on the GPU), 1 (cache.resident stream vs device), the memory table with its GPU max-allocated column,
# one fine-tuning epoch with autocast, and 5 with --device cuda; then the decode, resident and k-means
# tests (their GPU cases run where CUDA is present); benchmark 5 on the CPU cores on request.
# Each step has its own time limit and writes OUT/<step>.log; a failing step does not stop the rest.
# STEPS (space-separated step names, or prefixes such as "caching") runs only those, e.g. to split
# the run across two calls of a machine that limits one command's time.
#
#     bash benchmarks/gpu.sh [OUT]     # logs in OUT (default runs/gpu), runs in $WORK (runs/gpu-work)
#     STEPS="device_check inference caching" bash benchmarks/gpu.sh; STEPS="training_cost memory finetune_amp distributed gpu_tests" bash benchmarks/gpu.sh
set -u
out=${1:-runs/gpu}
work=${WORK:-runs/gpu-work}  # training runs and their caches (kept out of OUT)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
wanted() {  # wanted NAME: whether STEPS (when set) names NAME or a prefix of it
    [ -z "${STEPS:-}" ] && return 0
    local s
    for s in $STEPS; do [[ $1 == "$s"* ]] && return 0; done
    return 1
}
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tr "\r" "\n" <"$out/$name.log" | grep -v -i "warn\|rationality\|/s\]\|^\s*$" | tail -n 12
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step device_check 90 "$py" benchmarks/device_check.py --device cuda
step inference 120 "$py" benchmarks/inference.py --device cuda --repeats 51 --compile reduce-overhead
for backbone in torchvision/mobilenet_v2 timm/convnext_tiny torchvision/resnet50; do
    resized=()  # ResNet-50 also caches a `data resize` copy at 256 px beside the originals
    [ "$backbone" = torchvision/resnet50 ] && resized=(--resized 256)
    step "caching-${backbone#*/}" 180 "$py" benchmarks/caching.py --device cuda --backbone "$backbone" \
        --images 2048 --batch 128 --rounds 2 --workers -1 --bf16 --decode both ${resized[@]+"${resized[@]}"}
done
step training_cost 120 "$py" benchmarks/training_cost.py --device cuda --images 2000
step memory 240 "$py" benchmarks/memory.py --device cuda --entries 25000 50000 100000
step finetune_amp 150 "$py" -m protoquant.cli finetune --device cuda --finetune.amp true --finetune.epochs 2 \
    --finetune.batch_size 64 --data.synthetic_train_per_class 200 --cache.root "$work/cache" \
    --finetune.out "$work/finetune" --json
step distributed_cuda 150 "$py" benchmarks/distributed.py --device cuda --processes 1 --out "$work/dist-cuda"
if [ "${CPU_PROCESSES:-}" ]; then  # e.g. CPU_PROCESSES=1,2: benchmark 5 on the CPU cores as well
    step distributed_cpu 300 "$py" benchmarks/distributed.py --device cpu --processes "$CPU_PROCESSES" --out "$work/dist-cpu"
fi
step gpu_tests 180 "$py" -m pytest -q -p no:cacheprovider tests/cache/test_device_decode.py tests/train/test_resident.py tests/train/test_kmeans_sampling.py
