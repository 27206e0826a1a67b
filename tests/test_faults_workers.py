"""Faults with data-loader workers and around checkpoint writes, end to end on real processes.

Mid-epoch resume with 2 workers (bit-identical to an uninterrupted run), bad samples and non-finite losses
with workers (the run ends, no hang), the best checkpoint across a kill, stale temporary files of killed
writes, the log record across a kill, the preemption marker, a corrupt checkpoint-last.pth, changed
arguments on resume. The helpers and the uninterrupted reference run come from tests/test_faults.py.
"""
from __future__ import annotations

import signal
import time

import pytest

from test_faults import (STEPS, Proc, argv, assert_same_training_state, bad_data, data,  # noqa: F401
                         epoch_log, load, reference, run)


def test_sigterm_mid_epoch_with_two_workers_resumes_bit_identical(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = Proc(argv(data, out, "--num_workers", "2"))
    proc.wait_for(r"Epoch: \[1\] \[2/6\]")
    proc.signal(signal.SIGTERM)
    assert proc.finish() == 75, proc.output[-4000:]
    step = load(out / "checkpoint-last.pth")["data_position"]["step"]
    assert 3 <= step < STEPS
    code, text = run(argv(data, out, "--num_workers", "2"))
    assert code == 0, text[-4000:]
    assert f"continuing at epoch 1, step {step}/6" in text
    assert_same_training_state(load(reference / "checkpoint-2.pth"), load(out / "checkpoint-2.pth"))


@pytest.mark.parametrize("fault", ["bad_sample", "nonfinite"])
def test_fault_with_two_workers_ends_the_run(fault, data, bad_data, tmp_path):
    """Workers ignore SIGTERM; an error must still end the process (it used to hang at interpreter exit)."""
    root, faults = bad_data if fault == "bad_sample" else (data, {})
    inject = ["--nan_at_call", "8"] if fault == "nonfinite" else None
    start = time.monotonic()
    code, text = run(argv(root, tmp_path / "run", "--num_workers", "2"), inject=inject, timeout=60)
    took = time.monotonic() - start
    assert code == 1 and took < 60, (code, took, text[-3000:])
    if fault == "bad_sample":
        assert any(p in text for p in faults), text[-3000:]
    else:
        assert "non-finite loss nan at epoch 1, step 2/6 (global step 8)" in text, text[-3000:]
