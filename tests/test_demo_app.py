"""tools/demo_app.py: the demo engine's masks and pictures, bad inputs, the static export, and both pages
driven in headless Chromium (skipped, saying why, where no browser or Playwright/Gradio is installed)."""
import base64
import io
import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.lib.demo_engine import DemoEngine, DemoError, largest_remainder, share_positions
from tools.lib.pseudo_labelers import Labeller
from utils.data.synthetic import make_synthetic_dataset

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _demo_checkpoint(path: Path, **overrides) -> Path:
    """A checkpoint of the demo model of cfgs/pretrain/demo.yaml (96 px, rgb-depth-semseg), freshly initialised
    (seeded), saved as pre-training does: {'model': state dict, 'args': config}. Built directly rather than by
    run_pretraining_multimae.py so these tests follow the app, not the runner; the pictures they compare are
    whatever the weights compute."""
    import argparse

    import yaml

    from tools.visualize import _PUBLISHED_DEFAULTS
    from utils.pretrain.multimae import build_pretrain_model

    cfg = {**_PUBLISHED_DEFAULTS, **yaml.safe_load(Path("cfgs/pretrain/demo.yaml").read_text()), **overrides}
    torch.manual_seed(0)
    model = build_pretrain_model(argparse.Namespace(**cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "args": cfg}, path)
    return path


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """The demo model's checkpoint and a synthetic 96 px data set."""
    tmp = tmp_path_factory.mktemp("demo_app")
    make_synthetic_dataset(str(tmp / "data"), num_train=8, num_val=4, image_size=96, seed=3)
    if os.environ.get("DEMO_APP_CHECKPOINT"):  # e.g. `make demo`'s trained model, for telling screenshots
        return tmp, Path(os.environ["DEMO_APP_CHECKPOINT"])
    return tmp, _demo_checkpoint(tmp / "run" / "checkpoint-last.pth")


@pytest.fixture(scope="module")
def engine(demo_ckpt):
    return DemoEngine.from_checkpoint(str(demo_ckpt[1]), torch.device("cpu"))


def _files(tmp: Path, i: int = 0) -> dict:
    rgb = sorted((tmp / "data/val/rgb").rglob("*.png"))[i]
    rel = rgb.relative_to(tmp / "data/val/rgb")
    return {"rgb": str(rgb), "depth": str(tmp / "data/val/depth" / rel), "semseg": str(tmp / "data/val/semseg" / rel)}


def test_counts_and_nested_masks(demo_ckpt, engine):
    assert largest_remainder(36, [1, 1, 1], [36, 36, 36]) == [12, 12, 12]
    assert largest_remainder(36, [2, 1, 0], [36, 36, 36]) == [24, 12, 0]
    assert largest_remainder(50, [1, 1], [10, 100]) == [10, 40]
    assert len(share_positions(["rgb", "depth", "semseg"])) == 3 ** 3 - 1
    sample = engine.load_sample(_files(demo_ckpt[0]))
    visible = lambda m: {k: set(torch.nonzero(v == 0).flatten().tolist()) for k, v in m.items()}  # noqa: E731
    small, _ = engine.masks(sample, "visible", 12)
    big, caption = engine.masks(sample, "visible", 30)
    assert caption.startswith("30 visible tokens") and [len(v) for v in visible(big).values()] == [10, 10, 10]
    assert all(visible(small)[m] <= visible(big)[m] for m in small)  # the slider reveals more of the same order
    share, caption = engine.masks(sample, "share", {"rgb": 2, "depth": 1, "semseg": 0})
    assert [len(v) for v in visible(share).values()] == [24, 12, 0] and "rgb 67%" in caption
    masks, (px, py) = engine.hue_setup(sample)
    assert int((masks["rgb"] == 0).sum()) == 2 and masks["rgb"][py * engine.side + px] == 0
    assert int(masks["depth"].sum()) == 0 and int((masks["semseg"] == 0).sum()) == 0


def test_view_is_the_models_prediction(demo_ckpt, engine):
    sample = engine.load_sample(_files(demo_ckpt[0]))
    grid, _ = engine.view(sample, "visible", 18)
    masks, _ = engine.masks(sample, "visible", 18)
    with torch.no_grad():
        preds, _ = engine.model({m: sample.batch[m] for m in engine.inputs}, task_masks={m: v[None] for m, v in masks.items()})
    _, pred_tile, ref_tile = engine.painter.tiles("rgb", sample.batch["rgb"][0], preds["rgb"][0], masks["rgb"], True)
    tile, header = engine.painter.tile, 14
    assert np.array_equal(grid[header:header + tile, tile + 2:2 * tile + 2], pred_tile)
    hidden = np.kron((masks["rgb"] == 1).reshape(6, 6).numpy(), np.ones((tile // 6, tile // 6), bool))
    assert np.array_equal(pred_tile[~hidden], ref_tile[~hidden]) and not np.array_equal(pred_tile, ref_tile)
    other, _ = engine.view(sample, "visible", 90)
    assert not np.array_equal(grid, other)
    hue_a, hue_b = engine.view(sample, "hue", -0.3)[0], engine.view(sample, "hue", 0.3)[0]
    assert not np.array_equal(hue_a, hue_b)


class _ConstantDepth(Labeller):
    """A stand-in pseudo-labeller: depth grows from top to bottom."""

    def __init__(self):
        super().__init__("depth", 32)

    def forward(self, x):
        return torch.linspace(1, 2, 32).view(1, 1, 32, 1).expand(x.shape[0], 1, 32, 32) * 1000


def test_uploads_pseudo_labels_and_errors(demo_ckpt, engine, tmp_path):
    tmp, ckpt = demo_ckpt
    rgb_only = engine.load_sample({"rgb": _files(tmp)["rgb"]})
    assert rgb_only.present == {"rgb": True, "depth": False, "semseg": False}
    assert "hue" in engine.unsupported(rgb_only) and any("no pseudo-labeller" in n for n in rgb_only.notes)
    labelled = DemoEngine(engine.model, engine.cfg, engine.device, labellers={"depth": _ConstantDepth()})
    s = labelled.load_sample({"rgb": _files(tmp)["rgb"]})
    assert s.present["depth"] and "depth: pseudo-labelled from the RGB image" in s.notes
    assert s.batch["depth"][0, 0, -1].mean() > s.batch["depth"][0, 0, 0].mean()  # standardised, order kept
    labelled.view(s, "hue", 0.2)
    (tmp_path / "note.png").write_text("not an image")
    with pytest.raises(DemoError, match="cannot read rgb file"):
        engine.load_sample({"rgb": str(tmp_path / "note.png")})
    Image.fromarray(np.zeros((40, 50), np.uint16)).save(tmp_path / "small_depth.png")
    with pytest.raises(DemoError, match="same size"):
        engine.load_sample({"rgb": _files(tmp)["rgb"], "depth": str(tmp_path / "small_depth.png")})
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(DemoError, match="not a MultiMAE"):
        DemoEngine.from_checkpoint(str(tmp_path / "other.pth"), torch.device("cpu"))


def test_rgb_only_checkpoint_says_what_it_cannot_do(demo_ckpt, tmp_path):
    tmp, _ = demo_ckpt
    ckpt = _demo_checkpoint(tmp_path / "rgb_only.pth", in_domains="rgb", out_domains="rgb", num_encoded_tokens=12)
    eng = DemoEngine.from_checkpoint(str(ckpt), torch.device("cpu"))
    why = eng.unsupported()
    assert set(why) == {"share", "hue"} and "one input modality" in why["share"]
    sample = eng.load_sample(_files(tmp))
    assert eng.view(sample, "random", 0)[0].shape[1] > 3 * eng.painter.tile
    with pytest.raises(DemoError, match="rgb and depth"):
        eng.view(sample, "hue", 0.1)


def _decode_data_uri(uri: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_export_page_holds_every_position(demo_ckpt, engine, tmp_path, capsys):
    from tools import demo_app

    tmp, ckpt = demo_ckpt
    path = demo_app.main(["--checkpoint", str(ckpt), "--data_path", str(tmp / "data/val"), "--num_images", "1",
                          "--num_random", "1", "--export", str(tmp_path / "page")])
    total = 1 + sum(len(engine.positions(d)) for d in ("visible", "share", "hue"))
    assert f"{total}/{total} pictures" in capsys.readouterr().err
    text = Path(path).read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))
    eng = DemoEngine(engine.model, engine.cfg, engine.device, tile=96)  # the page's native-size tiles
    sample = eng.load_sample(_files(tmp, 0))
    for demo, i in (("visible", 3), ("share", 5), ("hue", 0)):
        k = data["images"][0]["views"][demo][i]
        assert np.array_equal(_decode_data_uri(data["pool"][k]), eng.view(sample, demo, data["positions"][demo][i])[0])
    assert "http" not in text.replace("http://www.w3.org", "")  # self-contained: nothing fetched


# ----------------------------------------------------------------------------------------------- browser
def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser: {CHROMIUM} missing (apt-get install chromium; see SETUP.md)")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
        import gradio  # noqa: F401
    except ImportError as e:
        pytest.skip(f"browser test needs playwright and gradio (pip install -r requirements-dev.txt): {e}")
    from playwright.sync_api import sync_playwright
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shown(page, demo: str) -> np.ndarray:
    src = page.locator(f"#{demo}_img img").first.get_attribute("src")
    return np.array(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _move(page, selector: str, value, demo: str) -> float:
    """Set a slider, wait until the demo's picture changes; returns the seconds it took."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    page.wait_for_selector(f"#{demo}_img img", timeout=20000)  # a freshly opened tab mounts its parts
    old = page.locator(f"#{demo}_img img").first.get_attribute("src")
    changed = (f"(old) => {{const i = document.querySelector('#{demo}_img img');"
               " return i && i.src && i.src !== old; }")
    start = time.perf_counter()
    for attempt in range(4):
        # A slider mounted a moment ago can miss the first input event (seen once in three runs right after
        # a tab switch: the value moved, no request left); filling again re-sends it. A real failure to
        # redraw still times out below.
        page.locator(f"{selector} input[type=range]").fill(str(value))
        try:
            page.wait_for_function(changed, arg=old, timeout=5000 if attempt < 3 else 20000)
            if attempt:
                print(f"\n{selector}: the picture changed after {attempt + 1} fills")
            break
        except PlaywrightTimeout:
            if attempt == 3:
                raise
    return time.perf_counter() - start


def _wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                           arg=[selector, text], timeout=20000)


def _shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DEMO_SCREENSHOT_DIR", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_live_app_in_chromium(demo_ckpt, tmp_path):
    sync_playwright = _browser_or_skip()
    from tools.lib.demo_gradio import DemoState, build_app, launch

    tmp, ckpt = demo_ckpt
    eng = DemoEngine.from_checkpoint(str(ckpt), torch.device("cpu"))
    state = DemoState(eng, [_files(tmp, i) for i in range(2)], torch.device("cpu"))
    app, port, shots = build_app(state), _free_port(), _shots_dir(tmp_path)
    launch(app, port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#random_img img", timeout=30000)
            assert np.array_equal(_shown(page, "random"), eng.view(state.samples[0], "random", 0)[0])
            _drive_live(page, state, eng, shots, tmp, tmp_path)
            browser.close()
    finally:
        app.close()


def _click_and_wait(page, selector: str, demo: str) -> None:
    old = page.locator(f"#{demo}_img img").first.get_attribute("src")
    page.click(selector)
    page.wait_for_function(f"(old) => document.querySelector('#{demo}_img img')?.src !== old", arg=old, timeout=20000)


def _drive_live(page, state, eng, shots, tmp, tmp_path):
    # tab 1: resample and next image
    _click_and_wait(page, "#resample", "random")
    assert np.array_equal(_shown(page, "random"), eng.view(state.samples[0], "random", 1)[0])
    _click_and_wait(page, "#next", "random")
    s1 = state.samples[1]
    assert np.array_equal(_shown(page, "random"), eng.view(s1, "random", 1)[0])
    page.screenshot(path=str(shots / "live_random.png"), full_page=True)
    # tab 2: visible tokens
    page.get_by_role("tab", name="Number of visible tokens").click()
    seconds = _move(page, "#visible_n", 24, "visible")
    assert np.array_equal(_shown(page, "visible"), eng.view(s1, "visible", 24)[0])
    _wait_text(page, "#visible_caption", "24 visible tokens")
    print(f"\nslider move -> new picture in the browser: {seconds:.3f} s")
    # tab 3: share sliders
    page.get_by_role("tab", name="Share per modality").click()
    _move(page, "#share_rgb", 2, "share")
    _move(page, "#share_semseg", 0, "share")
    assert np.array_equal(_shown(page, "share"), eng.view(s1, "share", {"rgb": 2, "depth": 1, "semseg": 0})[0])
    page.screenshot(path=str(shots / "live_share.png"), full_page=True)
    # tab 4: hue
    page.get_by_role("tab", name="Hue edit").click()
    _move(page, "#hue_shift", -0.2, "hue")
    assert np.array_equal(_shown(page, "hue"), eng.view(s1, "hue", -0.2)[0])
    # uploads: RGB + depth, then a bad RGB file, then a checkpoint that is not a MultiMAE
    files = _files(tmp, 3)
    page.locator("#upload_rgb input[type=file]").set_input_files(files["rgb"])
    page.locator("#upload_depth input[type=file]").set_input_files(files["depth"])
    page.wait_for_timeout(500)
    _click_and_wait(page, "#upload_go", "hue")
    _wait_text(page, "#status", "predicted from the other inputs only")
    up = eng.load_sample({"rgb": files["rgb"], "depth": files["depth"]}, name=Path(files["rgb"]).name)
    assert np.array_equal(_shown(page, "hue"), eng.view(up, "hue", -0.2)[0])
    page.screenshot(path=str(shots / "live_upload_hue.png"), full_page=True)
    (tmp_path / "bad.png").write_text("not an image")
    page.locator("#upload_rgb button[aria-label*='Clear'], #upload_rgb button[aria-label*='clear']").first.click()
    page.locator("#upload_rgb input[type=file]").set_input_files(str(tmp_path / "bad.png"))
    page.wait_for_timeout(500)
    page.click("#upload_go")
    _wait_text(page, "#status", "cannot read rgb file")
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "other.pth")
    page.locator("#upload_ckpt input[type=file]").set_input_files(str(tmp_path / "other.pth"))
    _wait_text(page, "#status", "not a MultiMAE")
    assert "Traceback" not in page.content()


def test_exported_page_in_chromium(demo_ckpt, engine, tmp_path):
    sync_playwright = _browser_or_skip()
    from tools.lib.demo_export import export_page

    tmp, _ = demo_ckpt
    eng = DemoEngine(engine.model, engine.cfg, engine.device, tile=96)
    samples = [eng.load_sample(_files(tmp, i), seed=i) for i in range(2)]
    path = export_page(eng, samples, str(tmp_path / "page"), num_random=2, stream=io.StringIO())
    shots = _shots_dir(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.goto(Path(path).as_uri())
        shown = lambda d: _decode_data_uri(page.locator(f"#{d}_img").get_attribute("src"))  # noqa: E731
        page.click("#next")
        page.click("#resample")
        assert np.array_equal(shown("random"), eng.view(samples[1], "random", 1)[0])
        for demo, sel, idx in (("visible", "#visible_n", 4), ("hue", "#hue_shift", 2)):
            page.click(f"#tab_{demo}")
            before = shown(demo)
            page.locator(sel).fill(str(idx))
            assert not np.array_equal(before, shown(demo))
            assert np.array_equal(shown(demo), eng.view(samples[1], demo, eng.positions(demo)[idx])[0])
        page.click("#tab_share")
        page.locator("#share_depth").fill("0")
        assert np.array_equal(shown("share"), eng.view(samples[1], "share", {"rgb": 1, "depth": 0, "semseg": 1})[0])
        page.screenshot(path=str(shots / "export_share.png"), full_page=True)
        browser.close()
