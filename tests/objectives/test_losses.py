"""finetune.objectives.losses: chunked CE over label positions equals the full-logits CE, and its memory
does not grow with the sequence while the full path's does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data_tools.render import IGNORE
from finetune.objectives.losses import chunked_ce_sum, full_ce_sum

ROOT = Path(__file__).resolve().parents[2]


def _softcapped_logits(h, w, cap):
    logits = h @ w.t()
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("chunk", [7, 256])
def test_chunked_equals_full(cap, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 40, 16, generator=g, requires_grad=True)
    # With the cap, weights large enough that it bends the logits.
    w = (torch.randn(300, 16, generator=g) * (4 if cap else 1)).requires_grad_()
    labels = torch.randint(0, 300, (2, 40), generator=g)
    labels[:, :7] = IGNORE
    labels[1, 20:30] = IGNORE
    if cap is not None:
        assert float(_softcapped_logits(h, w, None).abs().max()) > cap

    full = full_ce_sum(_softcapped_logits(h, w, cap), labels)
    gh_full, gw_full = torch.autograd.grad(full, (h, w))
    chunked = chunked_ce_sum(h, labels, w, cap, chunk)
    gh, gw = torch.autograd.grad(chunked, (h, w))
    assert torch.allclose(full, chunked, rtol=1e-6, atol=1e-4)
    assert float((gh - gh_full).abs().max()) <= 1e-5 * float(gh_full.abs().max())
    assert float((gw - gw_full).abs().max()) <= 1e-5 * float(gw_full.abs().max())


def test_no_labels_gives_a_zero_that_backpropagates():
    h = torch.randn(1, 5, 8, requires_grad=True)
    w = torch.randn(20, 8)
    labels = torch.full((1, 5), IGNORE)
    loss = chunked_ce_sum(h, labels, w, 30.0)
    assert float(loss) == 0.0
    loss.backward()  # a rank or micro-batch without labels must not crash the step
    assert float(h.grad.abs().sum()) == 0.0


# The measurement runs in a fresh interpreter with a fixed mmap threshold: every large
# tensor is then its own mapping, returned to the OS on free, so the peak RSS (VmHWM, reset
# through /proc/self/clear_refs before each run) follows the peak of live tensors instead of
# glibc's heap growth. A 16k vocab stands in for Gemma's 262k; what matters is the shape.
_MEASURE = textwrap.dedent("""
    import gc, json, re, sys, torch
    from finetune.objectives.losses import chunked_ce_sum, full_ce_sum
    torch.set_num_threads(1)

    def kb(field):
        return int(re.search(rf"{field}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    def peak_mib(fn):
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")
        base = kb("VmRSS")
        fn()
        return (kb("VmHWM") - base) / 1024

    V, H, CAP = 16384, 64, 30.0
    w = torch.randn(V, H) * 0.05
    out = {}
    for name, n in [("warmup", 256), ("chunked", 256), ("chunked", 2048), ("full", 256), ("full", 2048)]:
        h = torch.randn(1, n, H, requires_grad=True)
        labels = torch.randint(0, V, (1, n))
        if name == "full":
            fn = lambda: full_ce_sum(torch.tanh((h @ w.t()) / CAP) * CAP, labels).backward()
        else:
            fn = lambda: chunked_ce_sum(h, labels, w, CAP, 128).backward()
        out[f"{name}_{n}"] = peak_mib(fn)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_chunked_ce_memory_is_flat_in_sequence_length():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    mib = json.loads(res.stdout.strip().splitlines()[-1])
    # Full path: (n, V) fp32 logits, soft-capped copy, log-softmax and gradients all live at
    # once: 8x the tokens → ~8x the memory (16k vocab × 2048 × 4 B = 128 MiB per copy).
    assert mib["full_2048"] > 256, mib
    assert mib["full_2048"] > 4 * mib["full_256"], mib
    # Chunked: one 128-position chunk of logits at a time, whatever the length.
    assert mib["chunked_2048"] < mib["chunked_256"] + 16, mib
    assert mib["chunked_2048"] < mib["full_2048"] / 8, mib
