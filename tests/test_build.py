"""The native extension as built: build info, run-time ISA choice, traceability, setup.py logic."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fusedopt import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not _ops.available(), reason=f"fusedopt._C not built: {_ops.LOAD_ERROR}")
X86 = platform.machine() in ("x86_64", "AMD64")


def cpuinfo_field(name):
    """The value of the first ``name`` line of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags():
    flags = cpuinfo_field("flags")
    return None if flags is None else set(flags.split())


@needs_ext
def test_build_info_content():
    info = _ops.build_info()
    for key in ("compiler", "cxx_flags", "openmp", "cpu_isa_variants", "cpu_isa_best",
                "cpu_streams_default", "with_cuda",
                "cuda_reason", "cuda_arch_list", "torch_version"):
        assert key in info, key
    assert info["compiler"].split()[0] in ("gcc", "clang")
    assert info["openmp"] is True
    assert "-O3" in info["cxx_flags"] and "-fopenmp" in info["cxx_flags"]
    assert "-march=native" not in info["cxx_flags"]
    assert "scalar" in info["cpu_isa_variants"]
    if X86 and info["compiler"].startswith("gcc"):
        assert info["cpu_isa_variants"] == ["avx512bf16", "avx512", "avx2", "scalar"]
    assert isinstance(info["with_cuda"], bool) and isinstance(info["cuda_reason"], str)
    if info["with_cuda"]:
        assert info["cuda_arch_list"]
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


@needs_ext
def test_cpu_isa_matches_machine():
    from fusedopt import _C
    isa = _C.cpu_isa()
    assert isa in ("avx512bf16", "avx512", "avx2", "scalar")
    flags = cpu_flags()
    if flags is None or not X86 or os.environ.get("FUSEDOPT_CPU_ISA"):
        pytest.skip("no /proc/cpuinfo flags, not x86-64, or ISA overridden")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}
    if avx512 | {"avx512_bf16"} <= flags:
        expected = "avx512bf16"
    elif avx512 <= flags:
        expected = "avx512"
    elif {"avx2", "fma"} <= flags:
        expected = "avx2"
    else:
        expected = "scalar"
    assert isa == expected == _ops.build_info()["cpu_isa_best"]


@needs_ext
def test_set_cpu_isa():
    from fusedopt import _C
    current = _C.cpu_isa()
    assert _C._set_cpu_isa("scalar") == current
    try:
        assert _C.cpu_isa() == "scalar"
        with pytest.raises(ValueError, match="unknown CPU ISA 'sse9'"):
            _C._set_cpu_isa("sse9")
    finally:
        _C._set_cpu_isa(current)


@needs_ext
def test_isa_env_override():
    env = dict(os.environ, FUSEDOPT_CPU_ISA="scalar", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", "import fusedopt._C as C; print(C.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "scalar"


@needs_ext
def test_cpu_streams_default_follows_the_vendor():
    """1 sub-range on AMD CPUs, 2 elsewhere (isa.h, active_streams)."""
    from fusedopt import _C
    default = _ops.build_info()["cpu_streams_default"]
    vendor = cpuinfo_field("vendor_id")
    if X86 and vendor is not None:
        assert default == (1 if vendor == "AuthenticAMD" else 2), vendor
    else:
        assert default == 2
    if not os.environ.get("FUSEDOPT_CPU_STREAMS"):
        assert _C.cpu_streams() == default


@needs_ext
def test_set_cpu_streams():
    from fusedopt import _C
    current = _C.cpu_streams()
    other = 3 - current
    assert _C._set_cpu_streams(other) == current
    try:
        assert _C.cpu_streams() == other
        for bad in (0, 3, -1):
            with pytest.raises(ValueError, match=f"streams must be 1 or 2, got {bad}"):
                _C._set_cpu_streams(bad)
        assert _C.cpu_streams() == other
    finally:
        _C._set_cpu_streams(current)


@needs_ext
@pytest.mark.parametrize("value,expected", [("1", 1), ("2", 2), ("4", None), ("x", None)])
def test_cpu_streams_env_override(value, expected):
    """FUSEDOPT_CPU_STREAMS=1|2 at load time; anything else is ignored (the default stays)."""
    env = dict(os.environ, FUSEDOPT_CPU_STREAMS=value, PYTHONPATH=ROOT)
    code = ("import fusedopt._C as C; "
            "print(C.cpu_streams(), C.build_info()['cpu_streams_default'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    active, default = map(int, out.stdout.split())
    assert active == (default if expected is None else expected)


@needs_ext
@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_avx512_and_avx2_kernels_are_vectorised():
    """Every kernel of the AVX-512 / AVX2 variants really uses 512-bit / 256-bit registers, and
    the avx512bf16 variant's bf16 kernels (only they) round with vcvtneps2bf16.

    (A loop GCC fails to vectorise compiles silently to scalar code; this is how we notice.)
    """
    from fusedopt import _C
    if "avx512bf16" not in _ops.build_info()["cpu_isa_variants"]:
        pytest.skip("AVX-512 variants not compiled")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
                         capture_output=True, text=True, check=True).stdout
    kernel = re.compile(r"::(isa_avx512bf16|isa_avx512|isa_avx2|isa_scalar)::(adam|sgd)_kernel_impl<"
                        r"fusedopt::cpu::(\w+)")
    found = {}  # function signature -> [namespace, storage type, uses zmm, ymm, vcvtneps2bf16]
    current = None
    for line in out.splitlines():
        if line.endswith(">:"):
            match = kernel.search(line)
            current = line if match else None
            if match:
                found[line] = [match.group(1), match.group(3), False, False, False]
        elif current is not None:
            found[current][2] |= "%zmm" in line
            found[current][3] |= "%ymm" in line
            found[current][4] |= "vcvtneps2bf16" in line
    by_ns = {ns: [v[1:] for v in found.values() if v[0] == ns]
             for ns in ("isa_avx512bf16", "isa_avx512", "isa_avx2", "isa_scalar")}
    assert len(set(map(len, by_ns.values()))) == 1 and len(by_ns["isa_scalar"]) > 100
    for ns in ("isa_avx512bf16", "isa_avx512"):
        assert all(zmm for _, zmm, _, _ in by_ns[ns])
    assert all(ymm and not zmm for _, zmm, ymm, _ in by_ns["isa_avx2"])
    assert not any(zmm or ymm for _, zmm, ymm, _ in by_ns["isa_scalar"])
    assert {storage for storage, *_, bf16 in by_ns["isa_avx512bf16"] if bf16} == {"Bf16"}
    assert all(bf16 for storage, *_, bf16 in by_ns["isa_avx512bf16"] if storage == "Bf16")
    assert not any(bf16 for ns in ("isa_avx512", "isa_avx2", "isa_scalar")
                   for *_, bf16 in by_ns[ns])


# ---- fake implementations: torch.compile can trace the ops ---------------------------------------

def _adam_inputs(amsgrad):
    p = [torch.randn(4, 5), torch.randn(7)]
    return (p, [torch.randn_like(x) for x in p], [torch.zeros_like(x) for x in p],
            [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p] if amsgrad else [],
            [torch.tensor(0.0) for _ in p])


@needs_ext
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adam(amsgrad):
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
                  maximize=False, decoupled_weight_decay=True, lr_tensor=torch.tensor(1e-3),
                  grad_scale=torch.tensor(2.0))
    torch.library.opcheck(torch.ops.fusedopt.adam_.default, _adam_inputs(amsgrad), kwargs)


@needs_ext
def test_opcheck_sgd():
    p = [torch.randn(3, 3), torch.randn(2)]
    args = (p, [torch.randn_like(x) for x in p], [torch.zeros_like(x) for x in p])
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                  maximize=False, is_first_step=True)
    torch.library.opcheck(torch.ops.fusedopt.sgd_.default, args, kwargs)


@needs_ext
def test_torch_compile_fullgraph():
    def step(params, grads, exp_avgs, exp_avg_sqs, steps, lr):
        torch.ops.fusedopt.adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=0.0,
                                 beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                 amsgrad=False, maximize=False, decoupled_weight_decay=True,
                                 lr_tensor=lr)
        torch.ops.fusedopt.sgd_(params, grads, [], lr=0.0, momentum=0.0, dampening=0.0,
                                weight_decay=0.0, nesterov=False, maximize=False,
                                is_first_step=True, lr_tensor=lr)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = _adam_inputs(False), _adam_inputs(False)
    b = tuple([t.clone() for t in lst] for lst in a)
    lr = torch.tensor(1e-2)
    compiled(a[0], a[1], a[2], a[3], a[5], lr)
    step(b[0], b[1], b[2], b[3], b[5], lr)
    for x, y in zip(a[0] + a[2] + a[3] + a[5], b[0] + b[2] + b[3] + b[5]):
        assert torch.equal(x, y)
    assert a[5][0].item() == 1.0


# ---- setup.py logic (imported without building) --------------------------------------------------

@pytest.fixture
def setup_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("fusedopt_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.chdir(ROOT)
    spec.loader.exec_module(module)
    for var in ("FUSEDOPT_BUILD_CUDA", "FUSEDOPT_BUILD_CPU_ONLY", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return module


def test_setup_cuda_mode(setup_module, monkeypatch):
    assert setup_module.cuda_mode() == "auto"
    monkeypatch.setenv("FUSEDOPT_BUILD_CUDA", "0")
    assert setup_module.cuda_mode() == "off"
    monkeypatch.setenv("FUSEDOPT_BUILD_CUDA", "1")
    assert setup_module.cuda_mode() == "force"
    monkeypatch.setenv("FUSEDOPT_BUILD_CPU_ONLY", "1")
    assert setup_module.cuda_mode() == "off"
    monkeypatch.delenv("FUSEDOPT_BUILD_CPU_ONLY")
    monkeypatch.setenv("FUSEDOPT_BUILD_CUDA", "maybe")
    with pytest.raises(SystemExit, match="expected auto, 1 or 0"):
        setup_module.cuda_mode()


def test_setup_forced_cuda_without_nvcc_fails_clearly(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc anywhere
    monkeypatch.setenv("FUSEDOPT_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="FUSEDOPT_BUILD_CUDA=1 but .*nvcc"):
        setup_module.decide_cuda(torch)
    monkeypatch.setenv("FUSEDOPT_BUILD_CUDA", "auto")
    build, reason = setup_module.decide_cuda(torch)
    assert build is False and "nvcc" in reason


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_setup_cuda_home_from_nvcc(setup_module):
    home = setup_module.cuda_home_from_nvcc(shutil.which("nvcc"))
    assert home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(shutil.which("g++") is None or not X86
                    or "fma" not in (cpu_flags() or ()), reason="needs g++ and an x86-64 CPU with FMA")
def test_reciprocal_division_identity(tmp_path):
    """The identity divide_block relies on (a / d from 1/d and two FMAs, in range), checked
    bit for bit by tests/native/reciprocal_division.cpp on every significand of a for 8
    divisors (the session that wrote it ran 1000 divisors: no mismatch)."""
    exe = tmp_path / "reciprocal_division"
    subprocess.run(["g++", "-O2", "-mfma", "-o", str(exe),
                    os.path.join(os.path.dirname(__file__), "native", "reciprocal_division.cpp")],
                   check=True)
    out = subprocess.run([str(exe), "8", "3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert " 0 wrong" in out.stdout
