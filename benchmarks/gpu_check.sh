#!/usr/bin/env bash
# The GPU check, in one call of the workplace's `device` tool (an NVIDIA machine whose
# python3 holds a CUDA torch and h5py, and nothing else of ours; it cannot download):
#
#   make gpu-wheels            # here, once: the missing packages as wheels in .whl/ (~60 MB)
#   device run, carry [".whl"], command "bash benchmarks/gpu_check.sh", timeout_s 540
#
# CUDA end to end at EIGER2 4M and 16M: the default network with training on, the
# passthrough and near-free rows, the forward pass alone, float16/bfloat16 inference and
# tiled inference scored on the simulator's truth. The JSON and the log come back in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check.log"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu_check.log"
cd benchmarks
timeout 500 python3 detector_scale.py --device cuda --sizes 4M 16M --frames 150 \
    --network-frames 60 --forward-seconds 5 --repeat 2 --no-formats \
    --out "$OUT/detector_scale_cuda.json" 2>&1 | tee -a "$OUT/gpu_check.log"
