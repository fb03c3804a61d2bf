"""The prepared GPU run can't rot between GPU chances: its CPU dry run (same code path, tiny
model) runs here, and what the device tool carries stays under its 64 MiB limit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAVEL_LIMIT = 64 * 2**20
# What `make gpu-wheels` downloads (transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2),
# counted when .whl/ is not here (CI never fills it).
WHEEL_BYTES = 13_549_890 + 835_427 + 43_139_553


@pytest.mark.slow
def test_gpu_benchmark_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu (dry run)" and {"transformers", "peft", "bitsandbytes"} <= set(r["versions"])
    assert [x["seq_len"] for x in r["runs"]] == [160, 320]
    assert len(r["ablations"]) == 3
    for run in r["runs"] + r["ablations"]:
        assert all(math.isfinite(x) for x in run["losses"]) and run["tokens_per_s"] > 0
        assert run["planned_gib"] > run["planned_reserved_gib"] >= run["planned_allocated_gib"] > 0
    assert r["hf_baseline"]["seq_len"] == 160 and r["hf_baseline"]["tokens_per_s"] > 0
    tp = r["throughput"]
    assert tp["packed_rows"] < tp["samples"] and tp["ratio"] == pytest.approx(tp["ours"] / tp["hf"], abs=1e-3)


def test_what_travels_to_the_gpu_machine_fits():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    tree = sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    carried = sum(w.stat().st_size for w in wheels) if wheels else WHEEL_BYTES
    assert tree + carried < TRAVEL_LIMIT, f"tree {tree / 2**20:.1f} MiB + wheels {carried / 2**20:.1f} MiB"
    assert tree < 4 * 2**20  # the tree itself stays small: generated files stay out of it
