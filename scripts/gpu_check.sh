#!/usr/bin/env bash
# One command on a GPU machine (one H100/H200, no network): build, test and benchmark within a time budget, the
# most valuable part first, everything written to one folder of files that can be committed as they are.
#
#   bash scripts/gpu_check.sh [--budget SECONDS] [--out DIR] [--dry-run]
#
#   --budget   seconds of work, default 480 (8 minutes: a 15-minute GPU lease less start-up and transfers)
#   --out      default benchmarks/results/gpu-check-<gpu>-<UTC date and time>/
#   --dry-run  on any machine, no GPU needed (CI runs it): proves every part is well-formed without running it --
#              its commands exist, its test selections collect tests (on CPU tensors), its benchmark selections
#              resolve to ops, shapes and dtypes
#
# Order, and what each part takes on one H100/H200 (estimates until a GPU run measures them; every run writes the
# seconds each part took to <out>/summary.md). A part runs with at most its cap and never past the budget; a
# part that needs more than what is left is skipped, and the end of the run lists what was skipped.
#
#   1. environment + build     ~2 min   (cap 4)  pip install -e .: the cuda extension for this GPU's arch only, not
#                                                the cpu one (CI tests it; FASTADVSEG_NO_CPU_EXT=0 builds it too);
#                                                environment.txt: GPU, versions, backends. FAILS, with the end of the
#                                                build log (1-build-pip.log), unless fastadvseg._cuda_kernels imports
#                                                and available_backends("cuda") has cuda and triton: a GPU run never
#                                                goes on silently without the backends it is there to test
#   2. contract tests          ~2 min   (cap 3)  tests/test_losses.py and tests/test_ops.py on CUDA tensors, triton
#                                                and cuda backends: every op, dtype, layout and flag at one shape,
#                                                and opcheck of every registered op (tests/test_compile.py)
#                                                (scripts/gpu_check_plugin.py)
#  2b. GPU-only tests          ~1 min   (cap 2.5)  the tests that skip without a GPU (test_gpu_*, or a skip marker
#                                                saying it needs a GPU/CUDA): label reports under CUDA graphs, the
#                                                keep rule and exact counts on CUDA tensors, >2**31 elements, ...
#   3. core benchmark rows     ~1.5 min (cap 2 each)  VOC, then Cityscapes: generator_loss labelled and unlabelled,
#                                                cross_entropy2d; fp32 and bf16; eager vs triton vs cuda; with VOC,
#                                                their per-call host cost at a tiny shape (--call-overhead)
#  3b. upsampling rows         ~2 min   (cap 2 each)  VOC, then Cityscapes: the loss path as users call it, logits
#                                                at 1/8 and D's map at 1/32 of the labels upsampled inside the op
#                                                (softmax2d, cross_entropy2d, labelled generator_loss, and G's loss
#                                                path through a stand-in D); fp32 and bf16; eager vs triton vs cuda
#   4. the rest, while time remains:
#      a. the core rows + upsampling cross_entropy2d vs torch.compile ~3.5 min (cap 3 each)  VOC, Cityscapes
#      b. the other ops' rows (VOC, Cityscapes)                        ~2 min   (cap 1.5 each)
#      c. registers and spills with this machine's Triton and nvcc    ~0.5 min (cap 1.5)
#      d. one training iteration, fused vs reference losses           ~2.5 min (cap 3.5)  and --authors-loop: a
#                                                port of AdvSemiSeg's iteration (numpy round trips included) beside
#                                                the pipeline's step: fastadvseg's losses eager and compiled, plain ones
#      e. the training step compiled vs eager, graph breaks           ~2 min   (cap 3.5)  the pipeline's step with
#                                                the loss functions, fastadvseg's and the reference ones, plain and
#                                                under torch.compile (one compile each, then rotating blocks of steps)
#      f. the rest of the test suite on CUDA tensors (without 2 and 2b), until the budget is spent (pytest stops
#         starting tests)
#
# Exit status: 0 when nothing that ran failed (a part cut at its time limit is not a failure), 1 otherwise, 2 bad
# arguments. Needs a CUDA build of torch, Triton, a CUDA toolkit of torch's major version, pybind11, pytest,
# matplotlib, pyyaml and pillow already installed: nothing is downloaded (--no-deps, --no-build-isolation).
# PYTHON=<interpreter> picks the Python (default python3). Commit <out>/ as it is (logs, environment.txt,
# summary.md, the benchmark reports' .json/.md/.png).
set -uo pipefail
cd "$(dirname "$0")/.."

budget=480
out=""
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
        --budget=*) budget="${1#*=}"; shift ;;
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$budget" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds, got '$budget'" >&2; exit 2 ;; esac

py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"  # the pytest plugin
deadline=$((SECONDS + budget))
device=cuda
if [ "$dry" = 1 ]; then
    device=cpu
    out="${out:-$(mktemp -d)/gpu-check-dry-run}"
elif [ -z "$out" ]; then
    gpu="$($py -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu")')"
    slug="$(printf '%s' "$gpu" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')"
    out="benchmarks/results/gpu-check-${slug:-gpu}-$(date -u +%Y-%m-%d-%H%M)"
fi
mkdir -p "$out"
echo "gpu_check: budget ${budget} s, results in $out$([ "$dry" = 1 ] && echo ' (dry run)')"

status=0
rows=()
skipped=()

# part NAME CAP MIN KIND ARGS...: run (or, with --dry-run, check) one part, log in $out/NAME.log.
# KIND: build | pytest (ARGS: plugin mode and files) | bench (ARGS: benchmarks.report arguments) | module (ARGS:
# a python module and its arguments). CAP: most seconds it may take; MIN: it is skipped with less left than this.
part() {
    local name="$1" cap="$2" min="$3" kind="$4"
    shift 4
    local left=$((deadline - SECONDS)) t0=$SECONDS rc note
    if [ "$dry" = 1 ]; then
        check_part "$name" "$kind" "$@" >"$out/$name.log" 2>&1
        rc=$?
        note="$(tail -n 1 "$out/$name.log")"
        [ "$rc" = 0 ] || { status=1; tail -n 20 "$out/$name.log"; }
        echo "== dry run $name ($kind, cap ${cap} s): $([ "$rc" = 0 ] && echo ok || echo "FAILED rc=$rc") -- $note"
        rows+=("| $name | $kind | dry run: $([ "$rc" = 0 ] && echo ok || echo "failed ($rc)") | $note |")
        return
    fi
    if [ "$left" -lt "$min" ]; then
        skipped+=("$name (needs ~${min} s, ${left} s left)")
        rows+=("| $name | $kind | skipped: ${left} s left, needs ~${min} s | |")
        echo "== SKIP $name (${left} s left, needs ~${min} s)"
        return
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name: at most ${limit} s ($((left)) s of the budget left)"
    GPU_CHECK_DEADLINE=$(($(date +%s) + limit - 20)) timeout --kill-after=15 "$limit" \
        bash -c 'run_part "$@"' run_part "$name" "$kind" "$@" >"$out/$name.log" 2>&1
    rc=$?
    tail -n "$([ "$rc" = 0 ] || [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo 12 || echo 50)" "$out/$name.log"
    case "$rc" in
        0) note="ok" ;;
        124|137) note="cut at ${limit} s" ;;
        *) note="FAILED (exit $rc)"; status=1 ;;
    esac
    note="$note; $(grep -h '^gpu_check: .* not started' "$out/$name.log" | tail -n 1)"
    rows+=("| $name | $kind | ${note%; } | $((SECONDS - t0)) s |")
    echo "== $name: ${note%; }, $((SECONDS - t0)) s"
}

run_part() {  # what a part runs (under timeout, in a child bash: hence exported below)
    local name="$1" kind="$2"
    shift 2
    case "$kind" in
        build)
            local arch rc log="$out/1-build-pip.log"
            arch="$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
            # -v: pip passes on setup.py's output, where a cuda extension that failed to build is only a warning
            TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" FASTADVSEG_NO_CPU_EXT="${FASTADVSEG_NO_CPU_EXT:-1}" \
                $py -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1
            rc=$?
            grep -h 'fastadvseg: ' "$log"  # what setup.py said about the extensions
            environment >"$out/environment.txt"
            cat "$out/environment.txt"
            if [ "$rc" != 0 ]; then
                echo "gpu_check: FAILED: pip install exited $rc; the end of the build log ($log):"
                tail -n 40 "$log"
                return 1
            fi
            if ! $py -c "$BUILT_CHECK"; then
                echo "gpu_check: FAILED: the backends this run tests are not all there; the end of the build log ($log):"
                tail -n 40 "$log"
                return 1
            fi ;;
        pytest)
            local mode="$1"
            shift
            $py -m pytest -q -p no:cacheprovider -p gpu_check_plugin --gpu-check "$mode" --gpu-check-device "$device" \
                -rfE --durations=10 "$@" ;;
        bench)
            $py -m benchmarks.report --device "$device" --out "$out" --name "$name" "$@" ;;
        module)
            $py -m "$@" ;;
    esac
}

check_part() {  # --dry-run: is the part well-formed? The last line it prints goes to the summary.
    local name="$1" kind="$2"
    shift 2
    command -v timeout >/dev/null || { echo "timeout (coreutils) not found"; return 1; }
    case "$kind" in
        build)
            $py -m pip --version || return 1
            $py -c 'import setuptools, pybind11, torch' || return 1
            $py -c 'import ast, os; ast.parse(os.environ["BUILT_CHECK"])' || return 1  # part 1's verdict parses
            command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | tail -1)" || echo "nvcc not on PATH here"
            echo "pip, setuptools, pybind11 and torch import" ;;
        pytest)
            local mode="$1"
            shift
            local log
            log="$($py -m pytest -q -p no:cacheprovider -p gpu_check_plugin --gpu-check "$mode" \
                   --gpu-check-device "$device" --collect-only "$@" 2>&1)" || { echo "$log" | tail -n 30; return 1; }
            echo "$log" | grep '^gpu_check' || true
            echo "$log" | tail -n 1
            echo "$log" | tail -n 1 | grep -Eq '^[1-9][0-9]*(/[0-9]+)? tests? collected' ;;
        bench)
            $py - "$@" <<'PY'
import sys
from benchmarks.cases import select_cases
from benchmarks.report import parse_args
from benchmarks.shapes import shape_set

args = parse_args(sys.argv[1:])  # exits 2 on a bad flag or dtype
cases, shapes = select_cases(args.ops), shape_set(args.shapes)
assert cases and shapes
dtypes = args.dtypes or ["float32", "bfloat16", "float16"]
timed = "no op timing" if args.no_op_timing else (
    f"{len(cases)} rows x {len(shapes)} shapes x {len(dtypes)} dtypes: {', '.join(c.name for c in cases)} at "
    f"{', '.join(s.name for s in shapes)}, {', '.join(dtypes)}" + ("" if args.no_compile else ", with torch.compile"))
print(timed + ("; e2e: one training iteration, fused vs reference losses" if args.e2e else "")
      + ("; e2e-compile: the training step compiled vs eager" if args.e2e_compile else "")
      + ("; call-overhead: per-call cost at the smoke shape" if args.call_overhead else "")
      + ("; train-step: the pipeline's step, faults per step" if args.train_step else "")
      + ("; allocators: the steps under each allocator" if args.allocators else "")
      + ("; authors-loop: the authors' iteration vs ours" if args.authors_loop else ""))
PY
            ;;
        module)
            $py -c 'import importlib, sys; importlib.import_module(sys.argv[1])' "$1" || return 1
            $py -m "$1" --help >/dev/null || return 1
            echo "python -m $* (module imports, --help runs)" ;;
    esac
}

environment() {
    $py - <<'PY'
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
}
# part 1's verdict: the cuda extension imports, and both GPU backends are available on cuda
BUILT_CHECK='
import sys
import fastadvseg
problems = []
try:
    import fastadvseg._cuda_kernels
except Exception as exc:
    problems.append(f"fastadvseg._cuda_kernels does not import: {type(exc).__name__}: {exc}")
have = fastadvseg.available_backends("cuda")
problems += [f"backend {name} is not available on cuda: {fastadvseg.unavailable_reason(name)}"
             for name in ("cuda", "triton") if name not in have]
print("\n".join("gpu_check: FAILED: " + p for p in problems) or f"gpu_check: backends on cuda: {have}")
sys.exit(1 if problems else 0)
'
export -f run_part environment
export py device out BUILT_CHECK

core=(--ops generator_loss cross_entropy2d --dtypes float32 bfloat16 --no-plot)
vs_compile=(--ops generator_loss cross_entropy2d "cross_entropy2d[upsampled]" --dtypes float32 bfloat16 --no-plot)
upsampled=(--ops upsampled --dtypes float32 bfloat16 --no-compile --no-plot)
others=(--ops softmax2d bce_with_logits2d semi_cross_entropy2d one_hot2d discriminator_loss --dtypes float32 bfloat16
        --no-compile --no-plot)

part 1-build                240 60  build
part 2-contract-tests       180 45  pytest subset tests/test_losses.py tests/test_ops.py tests/test_compile.py
part 2b-gpu-only-tests      150 40  pytest gpu-only tests
part 3-bench-voc-core       120 40  bench --shapes voc "${core[@]}" --no-compile --call-overhead
part 3-bench-cityscapes-core 120 40 bench --shapes cityscapes "${core[@]}" --no-compile
part 3b-bench-voc-upsampled  120 40  bench --shapes voc "${upsampled[@]}"
part 3b-bench-cityscapes-upsampled 120 40 bench --shapes cityscapes "${upsampled[@]}"
part 4a-bench-voc-core-vs-compile        180 60 bench --shapes voc "${vs_compile[@]}" --backends triton cuda
part 4a-bench-cityscapes-core-vs-compile 180 60 bench --shapes cityscapes "${vs_compile[@]}" --backends triton cuda
part 4b-bench-voc-other-ops        90 40 bench --shapes voc "${others[@]}"
part 4b-bench-cityscapes-other-ops 90 40 bench --shapes cityscapes "${others[@]}"
part 4c-kernel-resources    90  30  module tools.compile_check --json "$out/4c-kernel-resources.json"
part 4d-bench-e2e           210 60  bench --shapes voc --e2e --no-op-timing --no-plot --authors-loop
part 4e-bench-e2e-compile   210 120 bench --shapes voc --e2e-compile --no-op-timing --no-plot
part 4f-rest-of-tests       600 30  pytest rest tests

{
    echo "# gpu_check $([ "$dry" = 1 ] && echo '(dry run) ')$(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "budget ${budget} s, used $((SECONDS - deadline + budget)) s; order and caps: scripts/gpu_check.sh"
    echo
    echo "| part | kind | result | time |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
    echo
    if [ "${#skipped[@]}" -gt 0 ]; then echo "Skipped (time budget):"; printf -- '- %s\n' "${skipped[@]}"; fi
} >"$out/summary.md"
echo
cat "$out/summary.md"
if [ "${#skipped[@]}" -gt 0 ]; then
    echo "gpu_check: skipped ${#skipped[@]} part(s): ${skipped[*]}"
else
    echo "gpu_check: no part skipped"
fi
grep -h '^gpu_check: .* not started' "$out"/*.log 2>/dev/null | sed 's/^/gpu_check: tests /' || true
exit "$status"
