#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the recipe matrix on the GPU (real fp16
# loss scaling, bf16 autocast) and the overhead benchmark on the GPU and on that machine's CPU.
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      # logs go to OUT_DIR (default: gpu_checks/)
set -uo pipefail
out="${1:-gpu_checks}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi -L | tee "$out/device.txt"
$python -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, torch.cuda.get_device_name())" | tee -a "$out/device.txt"
timeout 250 $python -m pytest -q -p no:cacheprovider tests/recipes/test_gpu_recipes.py tests/recipes/test_vision_libraries.py 2>&1 | tee "$out/gpu_recipes.txt" | tail -15
timeout 170 $python benchmarks/overhead.py --models mlp,lm --repeats 3 --accelerator gpu 2>&1 | tee "$out/overhead_gpu.txt"
timeout 140 $python benchmarks/overhead.py --models mlp --repeats 5 2>&1 | tee "$out/overhead_cpu.txt"
