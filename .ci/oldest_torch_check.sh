#!/usr/bin/env bash
# The test suite on the oldest torch fusedopt supports (torch 2.5.1, with its triton 3.1), for CI.
#
# The README's main commands pin torch 2.14.1; README.md's "Other torch versions" block (marker
# <!-- ci:oldest-torch -->) says how to install on another torch, and this script runs that block
# with torch 2.5.1, on a copy of the source tree (git's tracked + untracked-but-not-ignored
# files) in a temp dir with its own venv, then the whole suite there. Nothing in the repo is
# written. The CPU kernels only (FUSEDOPT_BUILD_CUDA=0): the CUDA build is compile-checked
# against the README's torch by cuda_compile_check.sh.
#
# numpy < 2 is installed after the block, so that the Triton kernels run in triton 3.1's
# interpreter (with numpy 2 the backend refuses that interpreter and its tests skip).
#
# Runtime on the 2-core CI box: torch 2.5.1 and its CUDA 12.4 libraries from PyPI (~3.6 GB of
# wheels, ~5.5 GB installed; ~1-2 min), the CPU build (~2-3 min), the suite (~4-6 min).
# KEEP_BUILD=1 keeps the temp dir.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

block="$(awk -v marker="<!-- ci:oldest-torch -->" '
    index($0, marker) { found = 1; next }
    found && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }' README.md)"
[ -n "$block" ] || { echo "oldest_torch_check: README.md has no <!-- ci:oldest-torch --> block" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/fusedopt-oldest-torch.XXXXXX")"
if [ "${KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$work"' EXIT; fi
git ls-files -co --exclude-standard -z | grep -zv '^benchmarks/results/' | \
    tar -cf - --null -T - | tar -xf - -C "$work"
cd "$work"
# No pip cache: the ~3.6 GB of wheels would sit there beside their ~5.5 GB installed copy.
export PIP_NO_CACHE_DIR=1
echo "=== README block (TORCH=2.5.1, FUSEDOPT_BUILD_CUDA=0) ==="
echo "$block"
echo "========================================================="
TORCH=2.5.1 FUSEDOPT_BUILD_CUDA=0 bash -euo pipefail -c "$block"
# shellcheck disable=SC1091
. .venv/bin/activate
# numpy 1.x: triton 3.1's interpreter cannot run with numpy 2 (docs/triton.md, "Triton versions"),
# and the Triton backend's kernels are what most needs testing on the oldest triton.
pip install -q "numpy<2"
python -c "import torch, fusedopt._C; print('oldest_torch_check: torch', torch.__version__)"
python -m pytest -q -n 2
