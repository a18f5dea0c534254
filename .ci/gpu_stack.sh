#!/usr/bin/env bash
# CI on the GPU machines' software stack, on this GPU-less machine: torch 2.11.0 (the CUDA 13.0 build the GPU
# image runs) with the Triton it brings (3.6), in a venv of its own, so the versions a GPU run meets are tested
# before a GPU run, beside the main stack (torch 2.13 CPU, Triton 3.9) that `python -m pytest -q` tests.
#
#   bash .ci/gpu_stack.sh        (.ci/run calls it after the README's test command)
#
#  1. venv       $FASTADVSEG_GPU_STACK_DIR/venv (default /tmp/fastadvseg-gpu-stack): torch==2.11.0 and the test
#                tools; about 5 GB, a minute or two from the registry the first time, then pip's cache and the venv
#                are reused (pip only checks what is there).
#  2. copy       the working tree (tracked and untracked files git does not ignore) into $DIR/src: the two stacks
#                never share build outputs (a _cuda_kernels .so built against torch 2.11 never lands in this
#                checkout, where the CPU torch would meet it).
#  3. build      the REAL cuda extension (fastadvseg._cuda_kernels) in the copy, `setup.py build_ext --inplace`
#                with CUDA_HOME unset, so setup.py finds the toolkit behind the nvcc on PATH itself (as on a GPU
#                machine); it must then import (it does without a GPU). The cpu extension is not built (the GPU
#                check does not build it either; the main stack tests it). No nvcc on PATH (no CUDA toolkit on
#                this machine): the build is SKIPPED with a line that says so, and the rest runs without it.
#  4. compile check  python -m tools.compile_check --no-cuda under Triton 3.6: registers and
#                spills of every Triton kernel for sm_90 (the main stack's pytest runs it under Triton 3.9; the nvcc
#                half does not depend on Triton and runs there).
#  5. tests      the op contract (losses, registered ops, edge cases, errors, the contract corpus, autograd,
#                torch.compile / torch.export of the ops under torch 2.11), the Triton kernels under the interpreter
#                (kernels, launchers, bytes moved, resources) and the cuda backend's kernels emulated on the CPU --
#                with the real extension built and imported beside them.
#
# Time on CI's 2 cores (measured): 2.7 minutes with the venv and caches of an earlier run, up to about 8 on a new
# machine under load (download and install of torch 2.11 about 1.5 minutes, from pip's cache 75 s; build 20-40 s;
# compile check 15-25 s with a cold Triton cache; tests 2-4.5 minutes).
#
# Exit status: 0 when every step that ran passed (a skipped build is not a failure), 1 otherwise.
# Environment: FASTADVSEG_GPU_STACK_DIR (where the venv and the copy live), GPU_STACK_TORCH (default 2.11.0),
# PYTHON (the interpreter the venv is made from; default python3).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${FASTADVSEG_GPU_STACK_DIR:-/tmp/fastadvseg-gpu-stack}"
torch_version="${GPU_STACK_TORCH:-2.11.0}"
venv="$dir/venv"
src="$dir/src"
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TESTS=(tests/test_losses.py tests/test_ops.py tests/test_edge_cases.py tests/test_errors.py tests/test_contract.py
       tests/test_autograd.py tests/test_compile.py
       tests/test_triton_kernels.py tests/test_triton_launchers.py tests/test_bytes_moved.py
       tests/test_kernel_resources.py tests/test_cuda_emulated_kernels.py tests/test_cuda_backend.py)

status=0
start=$SECONDS
step_start=$SECONDS
say() { echo "gpu_stack: $*"; }
done_step() { say "$1: $2 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }
fail() { say "FAILED: $*"; status=1; }

# 1. the venv ------------------------------------------------------------------------------------------------
mkdir -p "$dir"
if [ ! -x "$py" ]; then
    "${PYTHON:-python3}" -m venv "$venv" || { say "FAILED: cannot make a venv at $venv"; exit 1; }
fi
# setuptools < 82: torch 2.11's own requirement (a newer one only warns, but pip would report a conflict)
if ! "$py" -m pip install -q "torch==$torch_version" "setuptools>=77,<82" numpy pytest pytest-benchmark \
        "pybind11>=2.10" matplotlib pyyaml pillow; then
    say "FAILED: pip could not install torch==$torch_version and the test tools into $venv"
    exit 1
fi
versions="$("$py" -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}")' 2>&1)" \
    || { say "FAILED: the venv's torch/triton do not import: $versions"; exit 1; }
done_step "1 venv" "$versions"

# 2. a copy of the working tree --------------------------------------------------------------------------------
rm -rf "$src" && mkdir -p "$src"
if ! (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$src"; then
    say "FAILED: cannot copy the working tree of $root to $src"
    exit 1
fi
done_step "2 copy" "$(cd "$src" && find . -type f | wc -l) files in $src"

# 3. the real cuda extension --------------------------------------------------------------------------------
built=0
if command -v nvcc >/dev/null 2>&1; then
    if (cd "$src" && env -u CUDA_HOME -u CUDA_PATH FASTADVSEG_NO_CPU_EXT=1 "$py" setup.py -q build_ext --inplace) \
            >"$dir/build.log" 2>&1 \
       && (cd "$src" && "$py" -c 'import fastadvseg, fastadvseg._cuda_kernels as k, fastadvseg.backends.cuda
assert fastadvseg.unavailable_reason("cuda") is None, fastadvseg.unavailable_reason("cuda")
print(k.__file__)') >>"$dir/build.log" 2>&1; then
        built=1
        grep -h '^fastadvseg: ' "$dir/build.log" | sed 's/^/  /'
        done_step "3 build" "fastadvseg._cuda_kernels built against torch $torch_version and imported ($(tail -n 1 "$dir/build.log"))"
    else
        tail -n 40 "$dir/build.log"
        fail "the cuda extension did not build or does not import (log: $dir/build.log)"
        done_step "3 build" "FAILED"
    fi
else
    done_step "3 build" "SKIPPED: no CUDA toolkit here (nvcc is not on PATH); the rest runs without the real extension"
fi
if compgen -G "$root/fastadvseg/_cuda_kernels*.so" >/dev/null; then
    fail "a _cuda_kernels .so lies in $root/fastadvseg: the GPU stack's build must stay in $src"
fi

# 4. the compile check under this stack's Triton --------------------------------------------------------------
(cd "$src" && env -u TRITON_INTERPRET "$py" -m tools.compile_check --no-cuda --jobs 2 \
    --json "$dir/compile_check.json") >"$dir/compile_check.log" 2>&1
rc=$?
grep -E '^(compile_check|FAILED)' "$dir/compile_check.log" | sed 's/^/  /'
case "$rc" in
    0) done_step "4 compile check" "ok" ;;
    3) tail -n 5 "$dir/compile_check.log"; fail "the compile check cannot compile for sm_90 here"; done_step "4 compile check" "FAILED" ;;
    *) tail -n 60 "$dir/compile_check.log"; fail "the compile check exited $rc (log: $dir/compile_check.log)"
       done_step "4 compile check" "FAILED" ;;
esac

# 5. the tests --------------------------------------------------------------------------------------------------
say "5 tests: ${TESTS[*]} ($([ "$built" = 1 ] && echo 'real cuda extension built' || echo 'no real cuda extension'))"
(cd "$src" && FASTADVSEG_SKIP_NVCC_TEST=1 "$py" -m pytest -q -p no:cacheprovider "${TESTS[@]}")
rc=$?
[ "$rc" = 0 ] || fail "pytest on the GPU stack exited $rc"
done_step "5 tests" "$([ "$rc" = 0 ] && echo ok || echo FAILED)"

say "$versions: $([ "$status" = 0 ] && echo ok || echo FAILED), $((SECONDS - start)) s in all"
exit "$status"
