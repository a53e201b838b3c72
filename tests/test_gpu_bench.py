"""The one-call GPU benchmark script, dry-run on the CPU at tiny width: every run it makes, and its report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_script_dry_runs_every_table(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "eval" / "gpu_bench.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "gpu_bench.md").read_text()
    assert report.count("## ") == 5 and report.count("```") == 10
    for method in ("uncached", "fora:4", "toca:4:0.9:auto:auto", "fora:4:order=1", "fbc:0.1", "taylorseer:4", "magcache", "fora:3", "fora:4:order=1:store=float8"):
        assert method in report
    assert "breaks" in report  # the compiled run counts graph breaks and recompilations
