#!/usr/bin/env bash
# Compile-check the CUDA backend on a machine without a GPU or a CUDA build of torch, so that a syntax or template
# error cannot land unseen:
#  1. every fastadvseg/kernels/cuda/*.cu with nvcc alone (nvcc -c, sm_80 and sm_90 in one call per file, -O2), with the flags
#     of torch's CUDAExtension build (C++17, no implicit half/bfloat16 conversions or operators), warnings as errors;
#  2. the binding csrc/cuda/binding.cpp with `g++ -c` against the installed torch's headers (a CPU build of torch
#     ships the c10/cuda headers but not the one generated at its CUDA build, cuda_cmake_macros.h: a one-line
#     stand-in is used), then every launcher it calls is looked up among the symbols the .cu objects define (so a
#     declaration that drifted from its definition fails here, not at link time on a GPU machine).
#     Skipped when torch or g++ is missing; NVCC_CHECK_BINDING=0 skips it.
# Exits 0 with a skip line when nvcc is not installed; exits 1 if any file fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "nvcc_check: SKIP (nvcc not found on PATH; the CUDA kernels were not compile-checked)"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

flags=(-c -O2 -std=c++17 -Xcompiler -Wall -Werror all-warnings
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -I "$root/fastadvseg/kernels/cuda")

shopt -s nullglob
files=("$root"/fastadvseg/kernels/cuda/*.cu)
if [ "${#files[@]}" -eq 0 ]; then
    echo "nvcc_check: no fastadvseg/kernels/cuda/*.cu files found" >&2
    exit 1
fi

start=$SECONDS
status=0
for f in "${files[@]}"; do
    name="$(basename "$f" .cu)"
    if "$NVCC" "${flags[@]}" "$f" -o "$tmp/$name.o"; then
        echo "nvcc_check: ok   fastadvseg/kernels/cuda/$name.cu (sm_80, sm_90)"
    else
        echo "nvcc_check: FAIL fastadvseg/kernels/cuda/$name.cu" >&2
        status=1
    fi
done
echo "nvcc_check: ${#files[@]} file(s), $((SECONDS - start)) s, $("$NVCC" --version | tail -1)"

if [ "${NVCC_CHECK_BINDING:-1}" != "0" ]; then
    PYTHON="${PYTHON:-python}"
    torch_includes="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)"
    py_include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
    cuda_include="$(dirname "$(dirname "$(command -v "$NVCC")")")/include"
    [ -f "$cuda_include/cuda_runtime_api.h" ] || cuda_include="/usr/local/cuda/include"
    if [ -z "$torch_includes" ] || ! command -v g++ >/dev/null 2>&1; then
        echo "nvcc_check: SKIP binding check (needs torch and g++)"
    else
        mkdir -p "$tmp/stub/c10/cuda/impl"
        [ -f "${torch_includes%% *}/c10/cuda/impl/cuda_cmake_macros.h" ] ||
            printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
        inc=()
        for d in $torch_includes "$tmp/stub" "$py_include" "$cuda_include"; do inc+=(-isystem "$d"); done
        bstart=$SECONDS
        if g++ -c -O0 -fPIC -std=c++20 -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_cuda_kernels \
               -DTORCH_API_INCLUDE_EXTENSION_H "${inc[@]}" -I "$root/fastadvseg/kernels/cuda" "$root/csrc/cuda/binding.cpp" \
               -o "$tmp/binding.o"; then
            echo "nvcc_check: ok   csrc/cuda/binding.cpp (g++ -c against torch's headers, $((SECONDS - bstart)) s)"
            # every launcher the binding calls must be defined, with the same signature, by the .cu objects
            # (a declaration that drifted from its definition would otherwise only fail at link time on a GPU box)
            missing="$(comm -23 <(nm -C --undefined-only "$tmp"/*.o | grep -o 'fastadvseg::cuda::.*' | sort -u) \
                               <(nm -C --defined-only "$tmp"/*.o | grep -o 'fastadvseg::cuda::.*' | sort -u))"
            if [ -n "$missing" ]; then
                echo "nvcc_check: FAIL functions called (by the binding or a kernel file) but defined nowhere:" >&2
                echo "$missing" >&2
                status=1
            else
                echo "nvcc_check: ok   every launcher called by the binding or across kernel files is defined"
            fi
        else
            echo "nvcc_check: FAIL csrc/cuda/binding.cpp" >&2
            status=1
        fi
    fi
fi
exit $status
