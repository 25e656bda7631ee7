"""benchmarks/gpu_check.py at tiny sizes on the CPU: every check runs the code the GPU run will run (the
real step functions, samplers and DP modes), so the script is ready for the next lent GPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

_path = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check_bench", _path)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check_bench"] = gpu_check
_spec.loader.exec_module(gpu_check)


def test_tiny_gpu_check_runs_every_check(tmp_path):
    torch.manual_seed(0)
    result = gpu_check.run_checks(gpu_check.tiny_sizes(), torch.device("cpu"), 1, None, tmp_path / "none.json")
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    checks = [r["check"] for r in rows]
    assert checks[:4] == ["VAR-d16 sampling (arbooth)", "Infinity-2B sampling", "ARBooth-2B step full",
                          "ARBooth-2B step lora"]
    assert checks.count("DP book_keeping / nonprivate") == 2 and checks.count("DP ghost / nonprivate") == 2
    assert all(r["value"] > 0 for r in rows)
    assert all(r["memory_x"] > 0 for r in rows if r["check"].startswith("DP"))
    json.dumps(result)  # the JSON the command writes
    gpu_check.print_table(result)
