"""Every ```bash block of the docs runs in the default suite, or says in the doc why it cannot.

A block that cannot run here (it installs packages, needs a GPU cluster or SLURM, or is the test suite
itself) has ``<!-- not run: <reason> -->`` on the line right above its fence; the reason is the test's skip
reason. Every other block runs, in reading order, one bash script per block, in one temporary workspace
(links to ``cfgs/``, ``tools/``, the entry scripts; ``data/``, ``output/`` and ``real/`` are its own), shrunk
by the convention that SETUP.md states ("The docs' commands in the test suite"):

* ``make demo`` -> the pre-training command it runs (``-c cfgs/pretrain/demo.yaml``);
* ``torchrun [--opt=value ...] script.py`` -> ``python script.py`` (one process);
* ``tools/make_synthetic_dataset.py``: ``--num_train 8 --num_val 4 --num_test 4`` (image size kept);
* every ``run_*.py`` command gets :data:`SHRINK` appended (1 epoch of 1 step, batch 2, no pictures, CPU);
  a ViT-B config (``mae-b`` / ``multimae-b`` in its name) also gets the tiny model at 64 px;
* ``--finetune`` of a released weights file or a placeholder (``W.pth``, ``/path/to/...``) -> ``''``;
* ``tools/pseudo_label.py`` gets ``--max_images 4``, ``tools/benchmark.py`` ``--quick``,
  ``tools/make_shards.py`` ``--num_workers 0``; ``unzip A -d B`` -> ``python -m zipfile -e A B``;
* real data: ``/data/`` -> ``real/``, which holds stand-ins: fake official releases under ``real/raw/``
  (tests/fake_releases.py; the NYUv2 files also in the workspace root, the ADE20K zip there), the
  synthetic set as ImageNet (``real/imagenet/{train,val}``: its ``rgb/`` folders) and as the
  pseudo-labelled ImageNet (``real/multimae_imagenet/train``, ``real/imagenet_pl/train``), the synthetic
  Taskonomy layout as ``real/taskonomy``; the prepared NYUv2 / ADE20K / Hypersim / Taskonomy folders are
  written by SETUP.md's blocks. ``/shared/output/`` -> ``output/``; ``/tmp/published_multimae`` -> a
  stand-in package (tests/test_gpu_benchmark.py).

Each block starts with an empty ``output/`` apart from ``output/demo`` (the demo checkpoint the fine-tuning
blocks start from), as if it were run on its own after ``make demo``: blocks of different sections reuse a
config's default ``output_dir`` with other data or weights, and resuming such a run is refused. The
canonical synthetic set (SETUP.md) is generated first, shrunk the same way.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "SETUP.md", "PRETRAINING.md", "FINETUNING.md", "RELIABILITY.md", "ARCHITECTURE.md"]
MARKER = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
SHRINK = {"run_pretraining_multimae": "--epochs 1 --max_steps_per_epoch 1 --batch_size 2 --num_workers 0 "
                                         "--device cpu --save_vis_freq 0",
          "run_finetuning": "--epochs 1 --max_steps_per_epoch 1 --batch_size 2 --num_workers 0 --device cpu "
                            "--num_vis 0"}
TINY = {"run_pretraining_multimae": "--model pretrain_multimae_tiny --input_size 64 --num_encoded_tokens 16",
        "run_finetuning": "--model multivit_tiny --input_size 64"}
CANONICAL = ("python tools/make_synthetic_dataset.py --output_dir data/synthetic --num_train 512 --num_val 128 "
             "--image_size 96 --normals")
DEMO_SET = "python tools/make_synthetic_dataset.py --output_dir data/synthetic --num_train 512 --num_val 64 --image_size 96"
PLACEHOLDER_WEIGHTS = re.compile(r"--finetune (W\.pth|/path/to/\S+|\S*mae-b_\S+\.pth)(?=\s|$)")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    text: str
    reason: str | None  # the `not run` marker's reason; None: the block runs


def read_blocks(doc: str, text: str) -> tuple[list[Block], list[str]]:
    """The ```bash blocks of one doc, and the problems of its markers (a marker above no bash block)."""
    lines = text.split("\n")
    blocks, problems, i = [], [], 0
    while i < len(lines):
        if MARKER.match(lines[i]) and (i + 1 >= len(lines) or lines[i + 1] != "```bash"):
            problems.append(f"{doc}:{i + 1}: a 'not run' marker must be the line right above a ```bash fence")
        if lines[i] == "```bash":
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            m = MARKER.match(lines[i - 1]) if i else None
            blocks.append(Block(doc, i + 1, "\n".join(lines[i + 1:end]) + "\n", m["reason"] if m else None))
            i = end
        i += 1
    return blocks, problems


def bash_blocks() -> tuple[list[Block], list[str]]:
    """Every doc's blocks in reading order, and every marker problem."""
    blocks, problems = [], []
    for doc in DOCS:
        if (ROOT / doc).is_file():
            b, p = read_blocks(doc, (ROOT / doc).read_text())
            blocks += b
            problems += p
    return blocks, problems


def _shrink_line(code: str) -> str:
    code = re.sub(r"^(\s*)make demo\b", r"\1python run_pretraining_multimae.py -c cfgs/pretrain/demo.yaml", code)
    code = re.sub(r"\btorchrun(\s+--[\w-]+=\S+)*\s+(?=\S+\.py\b)", "python ", code)
    code = re.sub(r"(^|(?<=[\s='\"]))/data/", "real/", code)
    code = code.replace("/shared/output/", "output/").replace("/tmp/published_multimae", "published_multimae")
    code = re.sub(r"^(\s*)unzip (\S+) -d (\S+)", r"\1python -m zipfile -e \2 \3", code)
    code = PLACEHOLDER_WEIGHTS.sub("--finetune ''", code)
    if "make_synthetic_dataset.py" in code:
        code = re.sub(r"\s--num_(train|val|test) \d+", "", code) + " --num_train 8 --num_val 4 --num_test 4"
    for tool, extra in (("pseudo_label", "--max_images 4"), ("benchmark", "--quick"), ("make_shards", "--num_workers 0")):
        if re.search(rf"\btools/{tool}\.py\b", code):
            code += " " + extra
    for script, extra in SHRINK.items():
        if re.search(rf"\b{script}\w*\.py\b", code):
            code += " " + extra
            if re.search(r"-c \S*mae-b[_.]", code):
                code += " " + TINY[script]
    return code


def shrink(block: str) -> str:
    """The block with the substitutions of the module docstring applied (continuation lines joined)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            out.append(line)
            continue
        out.append(_shrink_line(line.partition(" #")[0]))
    return "\n".join(["set -euo pipefail", *out]) + "\n"


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done


def _real_data_stand_ins(ws: Path) -> None:
    """``real/`` (the docs' ``/data/``) as the module docstring describes it; needs ``data/synthetic``."""
    from tests.fake_releases import make_ade20k, make_hypersim, make_nyuv2, make_taskonomy
    from tests.test_gpu_benchmark import STAND_IN
    from utils.data.synthetic_taskonomy import make_taskonomy_dataset

    raw, synthetic = ws / "real/raw", ws / "data/synthetic"
    make_nyuv2(raw)
    for name in ("nyu_depth_v2_labeled.mat", "splits.mat", "classMapping40.mat"):
        shutil.copy(raw / name, ws / name)
    make_ade20k(ws / "ade/ADEChallengeData2016")
    with zipfile.ZipFile(ws / "ADEChallengeData2016.zip", "w") as z:
        for p in sorted((ws / "ade").rglob("*")):
            z.write(p, p.relative_to(ws / "ade"))
    csv_path, _ = make_hypersim(raw / "hypersim", {"ai_001_001": [("cam_00", 0, "train"), ("cam_00", 1, "val")]},
                                absent_scenes=("ai_001_002",))
    csv_path.rename(raw / "metadata_images_split_scene_v1.csv")
    make_taskonomy(raw / "taskonomy", {"allensville": "train", "beechwood": "val", "collierville": "test"},
                   size=(32, 32))  # square like the real views: the model's input is then square too
    (raw / "taskonomy/train_val_test_tiny.csv").rename(raw / "train_val_test_tiny.csv")
    make_taskonomy_dataset(str(ws / "real/taskonomy"), 4, 2, 2, 32, views_per_building=2)
    (ws / "real/taskonomy/splits").mkdir()
    for p in (ws / "real/taskonomy").glob("tiny_*.csv"):
        shutil.copy(p, ws / "real/taskonomy/splits" / p.name)
    for split in ("train", "val"):
        (ws / "real/imagenet").mkdir(parents=True, exist_ok=True)
        os.symlink(synthetic / split / "rgb", ws / "real/imagenet" / split)
    for name in ("multimae_imagenet", "imagenet_pl"):
        (ws / "real" / name).mkdir()
        os.symlink(synthetic / "train", ws / "real" / name / "train")
    (ws / "published_multimae/multimae").mkdir(parents=True)
    (ws / "published_multimae/multimae/__init__.py").write_text(STAND_IN)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("docs")
    for name in ["cfgs", "tools", "multimae", "utils", "Makefile", *[p.name for p in ROOT.glob("run_*.py")]]:
        os.symlink(ROOT / name, ws / name)
    _bash(shrink(CANONICAL), ws)
    _real_data_stand_ins(ws)
    return ws


BLOCKS, MARKER_PROBLEMS = bash_blocks()
RUN = [b for b in BLOCKS if b.reason is None]


def test_block_conventions():
    """Markers sit right above a block; no block uses the old in-block skip comment; the counts."""
    assert not MARKER_PROBLEMS, MARKER_PROBLEMS
    old = [f"{b.doc}:{b.line}" for b in RUN if re.match(r"# not run", b.text)]
    assert not old, f"blocks that say they are not run but carry no '<!-- not run: ... -->' marker: {old}"
    assert len(RUN) >= 20 and len(BLOCKS) - len(RUN) <= 16, (len(RUN), len(BLOCKS) - len(RUN))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.doc}:{b.line}" for b in BLOCKS])
def test_doc_block_runs(block, workspace):
    if block.reason is not None:
        pytest.skip(f"{block.doc}:{block.line}: marked not run: {block.reason}")
    for old in (workspace / "output").glob("*"):  # each block on its own, after `make demo`
        if old.name != "demo":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    _bash(shrink(block.text), workspace)


def test_shrink_substitutions():
    text = shrink("python run_finetuning_cls.py -c x.yaml \\\n    --epochs 3   # a comment\nmake demo\n"
                  "python tools/make_synthetic_dataset.py --output_dir d --num_train 512 --num_val 64\n"
                  "OMP_NUM_THREADS=1 torchrun --nproc_per_node=8 --master_port=29500 run_finetuning_cls.py "
                  "-c cfgs/ft_in1k_100e_multimae-b.yaml --finetune W.pth --data_path /data/imagenet/train\n"
                  "ln -s \"$PWD/data/synthetic\" x\n")
    lines = text.splitlines()
    assert lines[1].split() == ["python", "run_finetuning_cls.py", "-c", "x.yaml", "--epochs", "3", *SHRINK["run_finetuning"].split()]
    assert lines[2].startswith("python run_pretraining_multimae.py -c cfgs/pretrain/demo.yaml --epochs 1")
    assert lines[3] == "python tools/make_synthetic_dataset.py --output_dir d --num_train 8 --num_val 4 --num_test 4"
    assert lines[4].split() == ["OMP_NUM_THREADS=1", "python", "run_finetuning_cls.py", "-c",
                                "cfgs/ft_in1k_100e_multimae-b.yaml", "--finetune", "''", "--data_path",
                                "real/imagenet/train", *SHRINK["run_finetuning"].split(), *TINY["run_finetuning"].split()]
    assert lines[5] == "ln -s \"$PWD/data/synthetic\" x"


def test_marker_reading():
    text = "a\n<!-- not run: needs 8 GPUs -->\n```bash\necho 1\n```\n\n```bash\necho 2\n```\n<!-- not run: x -->\n\n```bash\n```\n"
    blocks, problems = read_blocks("D.md", text)
    assert [(b.line, b.text, b.reason) for b in blocks] == [(3, "echo 1\n", "needs 8 GPUs"), (7, "echo 2\n", None),
                                                             (12, "\n", None)]
    assert problems == ["D.md:10: a 'not run' marker must be the line right above a ```bash fence"]


def test_one_canonical_synthetic_set_and_the_demo_set(tmp_path):
    """SETUP.md defines both sets with the commands the tests use, `make demo` writes the demo set, every doc
    command that writes data/synthetic writes one of the two, and the demo set is the canonical set's first
    scenes file for file (what SETUP.md promises)."""
    from utils.data.synthetic import make_synthetic_dataset

    assert CANONICAL in (ROOT / "SETUP.md").read_text() and DEMO_SET in (ROOT / "SETUP.md").read_text()
    make = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    make_demo = re.search(r"make_synthetic_dataset\.py --output_dir \$\(DEMO_DATA\)([^\n]*)", make)[1].split()
    assert make_demo == DEMO_SET.split("--output_dir data/synthetic")[1].split()
    for b in BLOCKS:
        for line in b.text.replace("\\\n", " ").splitlines():
            code = line.partition(" #")[0].strip()
            if "make_synthetic_dataset.py" in code and re.search(r"--output_dir data/synthetic(\s|$)", code):
                assert code in (CANONICAL, DEMO_SET), f"{b.doc}:{b.line}: {code}"
    demo = make_synthetic_dataset(str(tmp_path / "demo"), num_train=4, num_val=2, image_size=16)
    canonical = make_synthetic_dataset(str(tmp_path / "canonical"), num_train=4, num_val=4, image_size=16,
                                       with_normals=True)
    assert set(canonical["modalities"]) - set(demo["modalities"]) == {"normal"}
    files = sorted(p.relative_to(tmp_path / "demo") for p in (tmp_path / "demo").rglob("*.png"))
    assert len(files) == 6 * 4
    for f in files:
        assert (tmp_path / "demo" / f).read_bytes() == (tmp_path / "canonical" / f).read_bytes(), f
