"""`python -m fusedopt info` prints backends (with reasons), build info, ISA and versions."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from fusedopt.__main__ import collect


def test_collect_has_versions_backends_and_isa():
    info = collect()
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"reference", "cpu", "triton", "cuda"}
    assert info["backends"]["reference"] == "available"
    assert "cpu_isa" in info and "build" in info and "triton" in info


def test_info_command_json_and_text():
    out = subprocess.run([sys.executable, "-m", "fusedopt", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    data = json.loads(out)
    assert data["backends"]["reference"] == "available"
    text = subprocess.run([sys.executable, "-m", "fusedopt", "info"], capture_output=True, text=True,
                          check=True).stdout
    assert "backends:" in text and "reference: available" in text
