"""Build of fusedopt._C: CPU kernels always, CUDA kernels when they can be built.

    pip install --no-build-isolation .        (torch must be installed first)
    pip install --no-build-isolation -e .     (editable)
    python setup.py build_ext --inplace       (while iterating on csrc/)

Environment switches
    FUSEDOPT_BUILD_CUDA=auto|1|0   auto (default): build csrc/cuda/*.cu when they exist, nvcc is
                                   found and torch is a CUDA build; 1: require that, failing
                                   with what is missing; 0: CPU only.
    FUSEDOPT_BUILD_CPU_ONLY=1      same as FUSEDOPT_BUILD_CUDA=0.
    FUSEDOPT_CUDA_ARCH_LIST        CUDA architectures, default "8.0;9.0+PTX" (sets TORCH_CUDA_ARCH_LIST;
                                   +PTX lets newer GPUs JIT-compile the kernels).
    CUDA_HOME                      CUDA toolkit; if unset it is taken from nvcc itself (see below).
    MAX_JOBS                       parallel compile jobs (read by torch's ninja build).

The CPU kernels are compiled once per ISA (AVX-512 with and without AVX512_BF16, AVX2, baseline;
csrc/cpu/kernels_*.cpp) and the variant is chosen when the extension loads, so the build never
uses -march=native and the result runs on any x86-64 machine. At run time,
FUSEDOPT_CPU_ISA=avx512|avx2|scalar caps that choice
(fusedopt._C.cpu_isa() reports it; fusedopt._C.build_info() reports how the build went), and
FUSEDOPT_CPU_STREAMS=1|2 sets how many sub-ranges the optimizer kernels walk side by side
(default 1 on AMD CPUs, 2 elsewhere; fusedopt._C.cpu_streams()).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
GENERATED_DIR = os.path.join(ROOT, "build", "fusedopt_generated")

CXX_FLAGS = [
    "-O3",
    "-fopenmp",  # the ops run one OpenMP parallel region (via at::parallel_for) per call
    # no FMA but those the update rules ask for (fma_ in rules.h, where torch's ops have one):
    # the fp32/fp64 steps then round as torch.optim's do
    "-ffp-contract=off",
    "-fno-math-errno",  # sqrt without errno handling, so that it vectorises
    # FP ops never trap (exceptions are masked, as always in torch), so GCC may evaluate both
    # arms of a select: without this the AVX2 bf16/fp16 loops are not vectorised at all.
    "-fno-trapping-math",
]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]  # keep CUDA compile flags minimal; torch adds its own defaults
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg):
    print(f"fusedopt setup: {msg}", file=sys.stderr)


def _truthy(value):
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def cuda_mode():
    """'auto', 'force' or 'off', from FUSEDOPT_BUILD_CUDA / FUSEDOPT_BUILD_CPU_ONLY."""
    if _truthy(os.environ.get("FUSEDOPT_BUILD_CPU_ONLY", "0")):
        return "off"
    raw = os.environ.get("FUSEDOPT_BUILD_CUDA", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on", "force"):
        return "force"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(f"FUSEDOPT_BUILD_CUDA={raw!r}: expected auto, 1 or 0")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def cuda_home_from_nvcc(nvcc):
    """The toolkit root as nvcc itself sees it (its TOP= variable).

    nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc), in which case
    torch's own guess (the parent of nvcc's directory) is wrong and linking fails with
    'cannot find -lcudart'.
    """
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-E", "-x", "cu", "/dev/null"],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else None


def decide_cuda(torch):
    """Returns (build_cuda: bool, reason: str). Raises SystemExit when forced but impossible."""
    mode = cuda_mode()
    if mode == "off":
        return False, "disabled (FUSEDOPT_BUILD_CUDA=0 / FUSEDOPT_BUILD_CPU_ONLY=1)"
    cu_sources = glob.glob(os.path.join(CSRC, "cuda", "*.cu"))
    missing = []
    if not cu_sources:
        missing.append("CUDA sources (no csrc/cuda/*.cu)")
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (installed: {torch.__version__}, CPU-only)")
    nvcc = find_nvcc()
    if nvcc is None:
        missing.append("nvcc (not on PATH and not under $CUDA_HOME/bin)")
    else:
        if not os.environ.get("CUDA_HOME"):
            home = cuda_home_from_nvcc(nvcc)
            if home is None:
                missing.append(f"CUDA_HOME (unset, and {nvcc} -dryrun did not print TOP=)")
            else:
                os.environ["CUDA_HOME"] = home
                _log(f"CUDA_HOME unset; using {home} (from {nvcc} -dryrun)")
        version = nvcc_version(nvcc)
        if version and torch.version.cuda and int(torch.version.cuda.split(".")[0]) != version[0]:
            missing.append(
                f"an nvcc matching torch's CUDA {torch.version.cuda} (found {version[0]}.{version[1]})"
            )
    if not missing:
        return True, f"built ({len(cu_sources)} .cu files)"
    reason = "missing " + "; ".join(missing)
    if mode == "force":
        raise SystemExit(f"FUSEDOPT_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


def c_string(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_build_config(torch, cxx_flags, nvcc_flags, arch_list, cuda_reason):
    os.makedirs(GENERATED_DIR, exist_ok=True)
    values = {
        "FUSEDOPT_BUILD_CXX_FLAGS": " ".join(cxx_flags),
        "FUSEDOPT_BUILD_CUDA_FLAGS": " ".join(nvcc_flags),
        "FUSEDOPT_BUILD_CUDA_ARCH_LIST": arch_list,
        "FUSEDOPT_BUILD_CUDA_HOME": os.environ.get("CUDA_HOME", "") if nvcc_flags else "",
        "FUSEDOPT_BUILD_TORCH_VERSION": torch.__version__,
        "FUSEDOPT_BUILD_TORCH_CUDA_VERSION": torch.version.cuda or "",
        "FUSEDOPT_BUILD_CUDA_REASON": cuda_reason,
    }
    text = "// Generated by setup.py; do not edit.\n#pragma once\n" + "".join(
        f"#define {k} {c_string(v)}\n" for k, v in values.items()
    )
    path = os.path.join(GENERATED_DIR, "fusedopt_build_config.h")
    # Rewrite only on change so that ninja does not recompile everything each time.
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extensions():
    import torch

    build_cuda, cuda_reason = decide_cuda(torch)
    # Only now: torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    from torch.utils import cpp_extension

    if build_cuda and cpp_extension.CUDA_HOME != os.environ.get("CUDA_HOME"):
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    _log(f"CUDA kernels: {cuda_reason}")

    sources = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "python_direct.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, CSRC, "include"), os.path.join(ROOT, CSRC), GENERATED_DIR]
    cxx_flags = list(CXX_FLAGS)
    if build_cuda:
        arch_list = os.environ.get("FUSEDOPT_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        cuda_sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        cxx_flags.append("-DFUSEDOPT_WITH_CUDA")
        nvcc_flags = NVCC_FLAGS + ["-DFUSEDOPT_WITH_CUDA"]
        write_build_config(torch, cxx_flags, nvcc_flags, arch_list, cuda_reason)
        ext = cpp_extension.CUDAExtension(
            "fusedopt._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=LINK_FLAGS,
        )
    else:
        write_build_config(torch, cxx_flags, [], "", cuda_reason)
        ext = cpp_extension.CppExtension(
            "fusedopt._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=LINK_FLAGS,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


if __name__ == "__main__":  # also true under pip / setuptools.build_meta; false when tests import it
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
