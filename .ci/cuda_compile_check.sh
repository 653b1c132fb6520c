#!/usr/bin/env bash
# Compile check of the CUDA backend, for CI machines without a GPU.
#
# Run inside an activated venv that has torch (a CUDA build, e.g. 2.14.1+cu130) and with nvcc on
# PATH. It copies the source tree (git's tracked + untracked-but-not-ignored files) to a temp
# dir, builds fusedopt._C there with the CUDA kernels forced on and one GPU architecture, imports
# that copy and checks that the CPU and CUDA kernels of every op (adam_, sgd_, total_norm, scale_,
# clamp_) are registered. A .cu/.cpp file that does not compile, a link error or a missing
# registration fails the check. Nothing in the repo is written: the in-place fusedopt/_C*.so and
# build/ stay as they were.
#
# Environment: FUSEDOPT_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2), KEEP_BUILD=1 keeps
# the temp dir. Runtime on the shared 2-core box: ~3 min of CPU; 10 min wall measured with
# MAX_JOBS=1 under a load average of ~9. Most of it is the host C++ that includes torch headers
# (csrc/ops.cpp alone ~1.5 min); the three .cu files take ~20 s. With the clipping ops
# (norm.cu, norm_ops.cpp): 6 min wall measured with MAX_JOBS=2 under a load average of ~4.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

command -v nvcc >/dev/null || { echo "cuda_compile_check: nvcc not on PATH" >&2; exit 1; }
python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || {
    echo "cuda_compile_check: torch in this venv is not a CUDA build" >&2; exit 1; }

# nvcc may be a wrapper outside the toolkit; its own TOP= is the real toolkit root (torch's
# guess from nvcc's location would be wrong and linking would fail with -lcudart missing).
top="$(nvcc -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
[ -n "$top" ] || { echo "cuda_compile_check: nvcc -dryrun printed no TOP=" >&2; exit 1; }
export CUDA_HOME="$(cd "$top" && pwd -P)"

work="$(mktemp -d "${TMPDIR:-/tmp}/fusedopt-cuda-check.XXXXXX")"
if [ "${KEEP_BUILD:-0}" != "1" ]; then trap 'rm -rf "$work"' EXIT; fi
paths=(csrc fusedopt setup.py pyproject.toml README.md)
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked and untracked-not-ignored files (no .so, no build/), skipping deleted ones.
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard -- "${paths[@]}") |
        while IFS= read -r -d '' f; do [ -e "$repo/$f" ] && printf '%s\0' "$f"; done |
        (cd "$repo" && tar -cf - --null -T -) | tar -xf - -C "$work"
else
    (cd "$repo" && tar -cf - --exclude='*.so' --exclude=__pycache__ --exclude=build \
        $(for p in "${paths[@]}"; do [ -e "$p" ] && echo "$p"; done)) | tar -xf - -C "$work"
fi

echo "cuda_compile_check: building in $work (CUDA_HOME=$CUDA_HOME, arch ${FUSEDOPT_CUDA_ARCH_LIST:-9.0})"
start=$(date +%s)
(cd "$work" && FUSEDOPT_BUILD_CUDA=1 FUSEDOPT_CUDA_ARCH_LIST="${FUSEDOPT_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-2}" python setup.py -q build_ext --inplace > build.log 2>&1) || {
    tail -n 60 "$work/build.log" >&2
    echo "cuda_compile_check: build FAILED (log above)" >&2
    exit 1
}
echo "cuda_compile_check: built in $(( $(date +%s) - start )) s"

cd "$work"
python - "$work" <<'PY'
import os
import sys

import torch

work = sys.argv[1]
sys.path.insert(0, work)
import fusedopt  # noqa: E402
from fusedopt import _norm_ops, _ops  # noqa: E402
from fusedopt.backends import cuda  # noqa: E402

assert os.path.realpath(fusedopt.__file__).startswith(os.path.realpath(work)), fusedopt.__file__
assert _ops.available(), f"fusedopt._C does not load: {_ops.LOAD_ERROR}"
info = _ops.build_info()
assert info.get("with_cuda"), f"build_info says CUDA was not built: {info.get('cuda_reason')}"
has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
# The optimizer ops (csrc/ops.cpp) and the clipping ops (csrc/cpu/norm.cpp, csrc/cuda/norm_ops.cpp).
ops = list(_ops.OP_NAMES) + list(_norm_ops.OP_NAMES)
missing = [f"fusedopt::{op} [{key}]" for op in ops for key in ("CPU", "CUDA")
           if not has_kernel(f"fusedopt::{op}", key)]
assert not missing, f"kernels not registered: {missing}"
assert cuda.kernels_registered()
assert all(_norm_ops.has_kernel(op, "cuda") for op in _norm_ops.OP_NAMES)
# the eager entry points that skip the dispatcher's boxing (csrc/python_direct.cpp)
direct = [name for name in (cuda.BACKEND.DIRECT_ADAM, cuda.BACKEND.DIRECT_SGD) if not hasattr(_ops._C, name)]
assert not direct, f"fusedopt._C lacks the direct CUDA entry points {direct}"
reason = cuda.BACKEND.unavailable_reason()
assert reason is None or "no CUDA device" in reason, reason
print(f"cuda_compile_check: OK: CUDA kernels registered for {ops} "
      f"(arch {info.get('cuda_arch_list')}); backend here: {reason or 'available'}")
PY
