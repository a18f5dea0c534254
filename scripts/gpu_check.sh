#!/usr/bin/env bash
# On a GPU machine: build every backend (cuda included), run the whole test suite on CUDA tensors, run the benchmark
# report, and keep the logs. Results land in ${OUT:-gpu_results}/ (commit the benchmark files under
# benchmarks/results/ with the GPU named; the report names its files by machine and date).
#
#   bash scripts/gpu_check.sh            # install + tests + benchmarks (VOC and Cityscapes shapes, e2e)
#   bash scripts/gpu_check.sh tests      # install + tests only          (each part fits in ~10 minutes on an H100)
#   bash scripts/gpu_check.sh bench      # install + benchmarks only
#
# Needs a CUDA build of torch, Triton, a CUDA toolkit of torch's major version, pybind11, pytest, pytest-benchmark,
# matplotlib, pyyaml and pillow already installed: nothing is downloaded (--no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3

echo "== install (cuda extension built against this torch)"
if ! $py -m pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1; then
    tail -40 "$out/install.log"; exit 1
fi
$py - <<'PY' | tee "$out/environment.txt"
import datetime, platform, torch
import fastadvseg
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("backends on cuda:", fastadvseg.available_backends("cuda"))
for name in fastadvseg.BACKEND_NAMES:
    reason = fastadvseg.unavailable_reason(name)
    if reason:
        print(f"  {name} unavailable: {reason}")
PY

status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    echo "== tests (shared suite on cuda and cpu, backend-specific GPU tests)"
    $py -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest_gpu.log" | tail -25
    status=${PIPESTATUS[0]}
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== benchmarks"
    stem="$($py -c 'import torch, datetime; print(torch.cuda.get_device_name().replace(" ", "_") + "-" + datetime.date.today().isoformat())')"
    $py -m benchmarks.report --shapes voc --device cuda --e2e --out "$out" --name "$stem-voc" 2>&1 | tee "$out/bench_voc.log" | tail -15
    $py -m benchmarks.report --shapes cityscapes --device cuda --out "$out" --name "$stem-cityscapes" 2>&1 | tee "$out/bench_cityscapes.log" | tail -15
fi
exit "$status"
