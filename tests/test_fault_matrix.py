"""tools/fault_matrix.py: one real cell (a truncated image, 0 workers, 1 process) end to end, the tables it
writes, and its argument checks."""
from __future__ import annotations

import json

import pytest

from tools import fault_matrix
from tools.lib.fault_cells import Cell, steps_done


def test_one_cell_end_to_end_writes_markdown_and_json(tmp_path):
    cells = fault_matrix.main(["--faults", "truncated_image", "--workers", "0", "--procs", "1",
                               "--out", str(tmp_path), "--timeout", "90"])
    assert len(cells) == 1
    cell = cells[0]
    assert (cell.fault, cell.workers, cell.procs, cell.exit_code) == ("truncated_image", 0, 1, 1)
    assert cell.outcome == "error naming the file" and 0 < cell.seconds < 90
    saved = json.loads((tmp_path / "fault_matrix.json").read_text())
    assert saved["cells"] == [{**saved["cells"][0], "fault": "truncated_image", "exit_code": 1}]
    assert saved["meta"]["command"].endswith("--timeout 90")
    table = (tmp_path / "fault_matrix.md").read_text().splitlines()
    assert table[2].startswith("| fault | workers | processes | exit code |")
    assert table[4].startswith("| truncated_image | 0 | 1 | 1 | error naming the file |")
    assert not (tmp_path / "runs").exists()  # the runs' folders are removed unless --keep_runs


def test_markdown_marks_hangs_and_inexact_resumes():
    rows = fault_matrix.markdown([Cell("sigterm", 2, 2, None, "hang, killed after 60 s", 60.0, 0, False, 3)])
    assert rows.splitlines()[2] == "| sigterm | 2 | 2 | hang | hang, killed after 60 s | 60.0 | 0 | **no** | 3 |"


def test_steps_done_reads_the_furthest_progress_line():
    assert steps_done("Epoch: [0] [3/4] loss\nEpoch: [1] [1/4] loss\nEpoch: [0] [3/4] loss\n") == 6
    assert steps_done("no progress yet") == 0


@pytest.mark.parametrize("argv, message", [(["--faults", "sigterm,oom"], "unknown ['oom']"),
                                           (["--procs", "3"], "--procs: '3' is not a list of [1, 2]"),
                                           (["--workers", "two"], "--workers: expected comma-separated integers")])
def test_bad_arguments_name_the_option(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        fault_matrix.main(argv)
