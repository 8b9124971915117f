#!/usr/bin/env bash
# GPU checks and benchmarks (one CUDA device), in order of what they settle, in two groups:
#   first:  caching against the bare forward pass (ResNet-50 with its `data resize` copy, ConvNeXt-T;
#           fp32 and bf16; JPEG decoding in the workers and on the GPU), training from the cache against
#           re-running the backbone, the head's share of inference (reference, fast, CUDA graphs), then
#           caching with MobileNetV2;
#   second: the GPU cases of the decode, view, batch-source, k-means and head tests, a decoded
#           batch's views one by one against batched, device decoding's batches crossing from 16
#           workers as one tensor against one per file, shard writes on that machine's cores (4
#           threads against the former 1), the memory table with its GPU max-allocated
#           column, the decode and batch-source cases again under the CUDA stream sanitizer,
#           device agreement with the CPU, one fine-tuning epoch with autocast, and benchmark 5
#           with --device cuda (benchmark 5 on the CPU cores on request).
# Each step has its own time limit and writes OUT/<step>.log; a failing step does not stop the rest.
# STEPS (space-separated group or step names, or prefixes such as "caching") runs only those. BUDGET
# (seconds) skips every step whose limit would end past it, so that one call returns, with its logs,
# inside the time a machine gives one command. Missing packages travel as wheels in .whl/ (made here by
# `bash benchmarks/gpu_wheels.sh`, installed into /tmp/site at the start).
#
#     bash benchmarks/gpu.sh [OUT]     # logs in OUT (default runs/gpu), runs in $WORK (runs/gpu-work)
#     STEPS=first BUDGET=480 bash benchmarks/gpu.sh "$OUT"; STEPS=second BUDGET=B bash benchmarks/gpu.sh "$OUT"
# On a lent machine the start (a minute or more) and the transfers count against the device time too:
# give the second call B = the device time then left, less a minute.
set -u
out=${1:-runs/gpu}
case $out in /*) ;; *) out=$PWD/$out ;; esac
cd "$(dirname "$0")/.."
work=${WORK:-runs/gpu-work}  # training runs and their caches (kept out of OUT)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # protoquant from this checkout
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
budget=${BUDGET:-0}  # 0: no budget
group_of() {  # group_of NAME: the group a step belongs to
    case $1 in caching-* | training_cost | inference) echo first ;; *) echo second ;; esac
}
wanted() {  # wanted NAME: whether STEPS (when set) names NAME, its group, or a prefix of it
    [ -z "${STEPS:-}" ] && return 0
    local s group
    group=$(group_of "$1")
    for s in $STEPS; do [[ $1 == "$s"* || $s == "$group" ]] && return 0; done
    return 1
}
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    if [ "$budget" -gt 0 ] && [ $((SECONDS + limit)) -gt "$budget" ]; then
        echo "== $name: skipped, its $limit s would end past BUDGET=$budget (at $SECONDS s)"
        return 0
    fi
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tr "\r" "\n" <"$out/$name.log" | grep -v -i "warn\|rationality\|/s\]\|^\s*$" | tail -n 12
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, torchvision, timm, protoquant.cli; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
    || echo "== setup: protoquant does not import (missing wheels? see benchmarks/gpu_wheels.sh)"
# ---- first
caching() {  # caching BACKBONE SECONDS [--resized PX]
    local backbone=$1 limit=$2
    shift 2
    step "caching-${backbone#*/}" "$limit" "$py" benchmarks/caching.py --device cuda --backbone "$backbone" \
        --images 2048 --batch 128 --rounds 2 --workers -1 --bf16 --decode both "$@"
}
caching torchvision/resnet50 150 --resized 256  # also caches a `data resize` copy at 256 px
caching timm/convnext_tiny 120
step training_cost 90 "$py" benchmarks/training_cost.py --device cuda --images 2000
step inference 90 "$py" benchmarks/inference.py --device cuda --repeats 51 --compile reduce-overhead
caching torchvision/mobilenet_v2 120
# ---- second
step gpu_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/cache/test_device_decode.py tests/cache/test_resample.py \
    tests/train/test_resident.py tests/train/test_kmeans_sampling.py tests/test_head_fast.py
step view_geometry 60 "$py" benchmarks/view_geometry.py --device cuda
step batch_transfer 60 "$py" benchmarks/batch_transfer.py --images 2048 --workers 16 --rounds 2
step shard_writes 60 "$py" benchmarks/shard_writes.py --shards 16 --rounds 2
step memory 180 "$py" benchmarks/memory.py --device cuda --entries 25000 50000 100000
# the CUDA cases of the two tests that hand tensors between streams, under PyTorch's stream sanitizer
# (CSAN), which stops at any kernel that reads or writes a tensor before the other stream's work on it
step stream_sanitizer 90 env TORCH_CUDA_SANITIZER=1 "$py" -m pytest -q -p no:cacheprovider \
    tests/cache/test_device_decode.py tests/train/test_resident.py -k cuda
step device_check 60 "$py" benchmarks/device_check.py --device cuda
step finetune_amp 90 "$py" -m protoquant.cli finetune --device cuda --finetune.amp true --finetune.epochs 2 \
    --finetune.batch_size 64 --data.synthetic_train_per_class 200 --cache.root "$work/cache" \
    --finetune.out "$work/finetune" --json
step distributed_cuda 90 "$py" benchmarks/distributed.py --device cuda --processes 1 --out "$work/dist-cuda"
if [ "${CPU_PROCESSES:-}" ]; then  # e.g. CPU_PROCESSES=1,2: benchmark 5 on the CPU cores as well
    step distributed_cpu 300 "$py" benchmarks/distributed.py --device cpu --processes "$CPU_PROCESSES" --out "$work/dist-cpu"
fi
