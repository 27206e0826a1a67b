"""Every ```bash block of the docs runs, on a shrunk copy of the synthetic data set.

A block whose first line is a comment ``# needs ...`` (real data, a GPU cluster) or ``# not run by tests: <reason>``
is skipped (and counted). The others run in order, one bash script per block, in a temporary workspace (links to
``cfgs/``, ``tools/``, the entry scripts; ``data/`` and ``output/`` are the workspace's own), with these
substitutions, so each finishes in seconds:

* ``make demo`` -> the pre-training command it runs (``-c cfgs/pretrain/demo.yaml``);
* ``tools/make_synthetic_dataset.py``: ``--num_train 8 --num_val 4 --num_test 4`` (image size kept);
* every ``run_*.py`` command gets :data:`SHRINK` appended (1 epoch of 1 step, batch 2, no pictures, CPU);
* ``tools/pseudo_label.py`` gets ``--max_images 4``.

The canonical synthetic set of the docs (SETUP.md) is generated first, shrunk the same way.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "SETUP.md", "PRETRAINING.md", "FINETUNING.md", "RELIABILITY.md", "ARCHITECTURE.md"]
SKIP = re.compile(r"^# (needs |not run by tests:)")
SHRINK = {"run_pretraining_multimae": "--epochs 1 --max_steps_per_epoch 1 --batch_size 2 --num_workers 0 "
                                         "--device cpu --save_vis_freq 0",
          "run_finetuning": "--epochs 1 --max_steps_per_epoch 1 --batch_size 2 --num_workers 0 --device cpu "
                            "--num_vis 0"}
CANONICAL = "python tools/make_synthetic_dataset.py --output_dir data/synthetic --image_size 96 --normals"


def bash_blocks() -> list[tuple[str, int, str]]:
    """(doc, line, text) of every ```bash block, in reading order."""
    blocks = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.is_file():
            continue
        text = path.read_text()
        for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
            blocks.append((doc, text[:m.start()].count("\n") + 1, m.group(1)))
    return blocks


def shrink(block: str) -> str:
    """The block with the substitutions of the module docstring applied (continuation lines joined)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        code, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line)
        if re.match(r"^\s*make demo\b", code):
            code = "python run_pretraining_multimae.py -c cfgs/pretrain/demo.yaml"
        if "make_synthetic_dataset.py" in code:
            code = re.sub(r"\s--num_(train|val|test) \d+", "", code) + " --num_train 8 --num_val 4 --num_test 4"
        if "pseudo_label.py" in code:
            code += " --max_images 4"
        for script, extra in SHRINK.items():
            if re.search(rf"\b{script}\w*\.py\b", code):
                code += " " + extra
        out.append(code)
    return "\n".join(["set -euo pipefail", *out]) + "\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("docs")
    for name in ["cfgs", "tools", "multimae", "utils", "Makefile", *[p.name for p in ROOT.glob("run_*.py")]]:
        os.symlink(ROOT / name, ws / name)
    _bash(shrink(CANONICAL), ws)
    return ws


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done


BLOCKS = bash_blocks()
COUNTS = {"run": sum(not SKIP.match(b) for _, _, b in BLOCKS), "skipped": sum(bool(SKIP.match(b)) for _, _, b in BLOCKS)}


def test_block_conventions():
    """Every block is either runnable or says why not; the counts are what the docs promise."""
    assert BLOCKS and COUNTS["run"] >= 7, COUNTS
    for doc, line, block in BLOCKS:
        first = block.splitlines()[0] if block.strip() else ""
        if first.startswith("# ") and ("needs" in first or "not run" in first):
            assert SKIP.match(block), f"{doc}:{line}: write '# needs ...' or '# not run by tests: <reason>'"


@pytest.mark.slow
@pytest.mark.parametrize("doc,line,block", BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_doc_block_runs(doc, line, block, workspace):
    if SKIP.match(block):
        pytest.skip(f"{doc}:{line}: {block.splitlines()[0][2:]}")
    _bash(shrink(block), workspace)


def test_shrink_substitutions():
    text = shrink("python run_finetuning_cls.py -c x.yaml \\\n    --epochs 3   # a comment\nmake demo\n"
                  "python tools/make_synthetic_dataset.py --output_dir d --num_train 512 --num_val 64\n")
    lines = text.splitlines()
    assert lines[1].split() == ["python", "run_finetuning_cls.py", "-c", "x.yaml", "--epochs", "3", *SHRINK["run_finetuning"].split()]
    assert lines[2].startswith("python run_pretraining_multimae.py -c cfgs/pretrain/demo.yaml --epochs 1")
    assert lines[3] == "python tools/make_synthetic_dataset.py --output_dir d --num_train 8 --num_val 4 --num_test 4"
