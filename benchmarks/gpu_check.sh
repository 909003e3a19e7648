#!/usr/bin/env bash
# The GPU checks of this project in one script, for a lent GPU machine (run from the repository root):
# the CUDA tests (AMP, smp taps, the fused SelfReg loss eager and through Inductor against the reference, with
# no host sync), the SelfReg overhead benchmark at the paper's size (arms none, fused, fused-compile, ours-eager,
# authors-none, authors, interleaved; peak memory, host syncs and CUDA kernels per step), the memory traffic of
# each loss, and the default run on the GPU. Expect about 8 min (Inductor compiles the fused loss in the tests
# and in the benchmark's warm-up); the timeouts cap it at 14 min. Results go to $OUT (or ./gpu_check_out). The
# GPU image has torch, lightning and torchmetrics but no wandb/albumentations/monai/jsonargparse; wheels placed in
# .whl/ are installed first. The default run needs the command line's: `pip download --no-deps -d .whl
# "jsonargparse[signatures]" docstring-parser typeshed-client wandb albumentations==2.0.8 albucore ...` on a machine
# with the package registry (then `carry` .whl; segmentation_models_pytorch only if its timm/torchvision fit).
set -u
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
echo "== GPU tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/segmentation/test_precision.py tests/models/test_third_party.py \
  tests/selfreg/test_fused_losses.py -k "amp_on_gpu or smp or cuda" > "$OUT/tests.log" 2>&1
grep -a -E "^E |passed|failed" "$OUT/tests.log" | head -20
echo "== SelfReg overhead"
timeout 300 python3 benchmarks/selfreg_overhead.py --json "$OUT/overhead.json" > "$OUT/overhead.log" 2>&1
tail -45 "$OUT/overhead.log"
echo "== SelfReg memory traffic (paper size, bytes and aten ops of each loss)"
timeout 60 python3 benchmarks/selfreg_overhead.py --traffic --modes fp32,bf16-cl > "$OUT/traffic.log" 2>&1
tail -12 "$OUT/traffic.log"
echo "== default run on the GPU"
/usr/bin/time -f "wall %e s" timeout 300 python3 -m experiments.run --gpus 1 --wandb disabled \
  --output-dir /tmp/gpu_check_runs --run-name default > "$OUT/run.log" 2>&1
grep -a -A14 "Test results" "$OUT/run.log"; grep -a "^wall" "$OUT/run.log"
