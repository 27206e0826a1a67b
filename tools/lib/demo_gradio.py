"""The live demo page: a Gradio app with one tab per demo of ``tools/lib/demo_engine.py``.

Gradio is imported here only (an optional, test/demo-time dependency; training never imports this
module). Analytics are switched off before the import and the app serves on 127.0.0.1 without share
links, so nothing leaves the machine. Every callback turns errors into one sentence in the status box
(elem_id ``status``), never a traceback on the page.

Element ids (what tests drive): ``image`` (picker), ``prev``/``next``/``resample`` buttons,
``upload_rgb``/``upload_depth``/``upload_semseg``/``upload_go``, ``upload_ckpt``; per demo ``<demo>_img`` and
``<demo>_caption``; sliders ``visible_n``, ``share_<modality>``, ``hue_shift``.
"""
from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from tools.lib.demo_engine import DEMOS, HUE_STEPS, SHARE_LEVELS, TITLES, DemoEngine, DemoError, Sample

SHARE_MODALITIES = ("rgb", "depth", "semseg")  # sliders built for these (plus any other input); hidden if absent
UPLOAD = "uploaded image"


class DemoState:
    """What the page shows: the engine, the data-set samples, an uploaded sample and the current choice."""

    def __init__(self, engine: DemoEngine, files: list[dict[str, str]], device: torch.device):
        self.engine, self.files, self.device = engine, files, device
        self.lock = threading.Lock()
        self.samples = [engine.load_sample(f, seed=i) for i, f in enumerate(files)]
        self.upload: Sample | None = None
        self.current, self.seed = 0, 0

    def sample(self) -> Sample:
        if self.current == -1 and self.upload is not None:
            return self.upload
        if not self.samples:
            raise DemoError("no image yet: upload one")
        return self.samples[min(max(self.current, 0), len(self.samples) - 1)]

    def choices(self) -> list[str]:
        names = [f"{i}: {s.name}" for i, s in enumerate(self.samples)]
        return names + ([f"{UPLOAD}: {self.upload.name}"] if self.upload else [])

    def choice(self) -> str | None:
        names = self.choices()
        return None if not names else names[-1] if self.current == -1 else names[self.current]

    def value(self, demo: str, controls: dict[str, Any]) -> Any:
        """Control value of ``demo`` from the widget values (snapped to the demo's positions)."""
        if demo == "random":
            return self.seed
        if demo == "visible":
            steps = self.engine.visible_steps()
            return min(steps, key=lambda s: abs(s - float(controls["visible"])))
        if demo == "share":
            return {m: int(round(float(controls["share"].get(m, 0)))) for m in self.engine.inputs}
        return min(HUE_STEPS, key=lambda s: abs(s - float(controls["hue"])))

    def render(self, demo: str, controls: dict[str, Any]) -> tuple[np.ndarray | None, str]:
        """(picture or None, caption) for the current sample; problems become the caption."""
        try:
            grid, caption = self.engine.view(self.sample(), demo, self.value(demo, controls))
            return grid, caption
        except DemoError as e:
            return None, f"**Not available:** {e}"

    def header(self) -> str:
        e = self.engine
        lines = [f"**Checkpoint:** inputs {', '.join(e.inputs)}; outputs {', '.join(e.outputs)}; "
                 f"{e.cfg.input_size} px, {e.n_tokens} tokens per modality; running on {self.device}."]
        why = e.unsupported()
        if why:
            lines.append("**This checkpoint cannot run:** " + "; ".join(f"{TITLES[d]} ({w})" for d, w in why.items()))
        return "\n\n".join(lines)

    def notes(self) -> str:
        try:
            s = self.sample()
        except DemoError as e:
            return str(e)
        notes = list(s.notes)
        if not any(s.present.get(m) for m in self.engine.inputs if m != "rgb"):
            notes.append("running from RGB alone")
        return f"**{s.name}:** " + ("; ".join(notes) if notes else "all modalities given") + "."


def _layout(state: DemoState, gr: Any, share_mods: list[str]) -> SimpleNamespace:
    """Create the page's components (inside an open gr.Blocks); returns them by name."""
    e, ui = state.engine, SimpleNamespace(imgs={}, caps={})
    gr.Markdown("# MultiMAE: masked multi-modal reconstruction, computed live")
    ui.header = gr.Markdown(state.header(), elem_id="header")
    with gr.Row():
        ui.picker = gr.Dropdown(state.choices(), value=state.choice(), label="image", elem_id="image")
        ui.prev = gr.Button("previous image", elem_id="prev")
        ui.next = gr.Button("next image", elem_id="next")
    with gr.Accordion("upload an image (optional depth and semseg files) or another checkpoint", open=True):
        with gr.Row():
            ui.up_rgb = gr.File(label="RGB image", elem_id="upload_rgb")
            ui.up_depth = gr.File(label="depth (16-bit PNG, same size)", elem_id="upload_depth")
            ui.up_sem = gr.File(label="semseg (class-id PNG, same size)", elem_id="upload_semseg")
            ui.up_ckpt = gr.File(label="checkpoint (.pth / .safetensors)", elem_id="upload_ckpt")
        ui.up_go = gr.Button("use uploaded image", elem_id="upload_go")
    ui.status = gr.Markdown(state.notes(), elem_id="status")
    steps = e.visible_steps()
    with gr.Tabs():
        for demo in DEMOS:
            with gr.Tab(TITLES[demo], elem_id=f"tab_{demo}"):
                if demo == "random":
                    ui.resample = gr.Button("resample mask", elem_id="resample")
                elif demo == "visible":
                    ui.visible = gr.Slider(steps[0], steps[-1], step=steps[1] - steps[0] if len(steps) > 1 else 1,
                                           value=min(steps, key=lambda s: abs(s - e.cfg.num_encoded_tokens)),
                                           label="visible tokens", elem_id="visible_n")
                elif demo == "share":
                    ui.shares = [gr.Slider(0, SHARE_LEVELS - 1, value=1, step=1, label=f"{m} weight",
                                           elem_id=f"share_{m}", visible=m in e.inputs) for m in share_mods]
                else:
                    ui.hue = gr.Slider(HUE_STEPS[0], HUE_STEPS[-1], value=0.3, step=0.1, label="hue shift",
                                       elem_id="hue_shift")
                ui.caps[demo] = gr.Markdown(elem_id=f"{demo}_caption")
                ui.imgs[demo] = gr.Image(type="numpy", format="png", interactive=False, show_label=False,
                                         elem_id=f"{demo}_img")
    ui.controls = [ui.visible, ui.hue, *ui.shares]
    ui.views = [x for d in DEMOS for x in (ui.imgs[d], ui.caps[d])]
    return ui


class _Handlers:
    """The page's callbacks. Each takes the control values last and returns the values of its outputs;
    ``guarded`` turns any error into one sentence in the status box (the last output)."""

    def __init__(self, state: DemoState, gr: Any, share_mods: list[str]):
        self.state, self.gr, self.share_mods = state, gr, share_mods

    def guarded(self, fn: Callable[..., list[Any]], n_out: int) -> Callable[..., list[Any]]:
        def run(*args):
            with self.state.lock:
                try:
                    return fn(*args)
                except Exception as err:  # noqa: BLE001 -- the page shows one sentence, never a traceback
                    msg = err.args[0] if isinstance(err, DemoError) and err.args else f"{type(err).__name__}: {err}"
                    return [self.gr.update()] * (n_out - 1) + [f"**Error:** {msg}"]
        return run

    def read(self, v, h, *ws) -> dict[str, Any]:
        return {"visible": v, "hue": h, "share": dict(zip(self.share_mods, ws))}

    def all_views(self, *c) -> list[Any]:
        return [x for d in DEMOS for x in self.state.render(d, self.read(*c))]

    def picked(self) -> Any:
        return self.gr.update(choices=self.state.choices(), value=self.state.choice())

    def one(self, demo: str) -> Callable[..., list[Any]]:
        return lambda *c: [*self.state.render(demo, self.read(*c)), self.gr.update()]

    def init(self, *c) -> list[Any]:
        return [*self.all_views(*c), self.state.notes()]

    def pick(self, choice, *c) -> list[Any]:
        names = self.state.choices()
        self.state.current = -1 if str(choice).startswith(UPLOAD) else names.index(choice) if choice in names else 0
        return [*self.all_views(*c), self.state.notes()]

    def step(self, delta: int) -> Callable[..., list[Any]]:
        def go(*c):
            st = self.state
            st.current = (max(st.current, 0) + delta) % len(st.samples) if st.samples else -1
            return [self.picked(), *self.all_views(*c), st.notes()]
        return go

    def resample(self, *c) -> list[Any]:
        self.state.seed += 1
        return [*self.state.render("random", self.read(*c)), self.gr.update()]

    def upload(self, rgb, depth, sem, *c) -> list[Any]:
        if rgb is None:
            raise DemoError("choose an RGB image file first")
        files = {"rgb": _path(rgb), "depth": _path(depth), "semseg": _path(sem)}
        self.state.upload = self.state.engine.load_sample(files, name=os.path.basename(files["rgb"]))
        self.state.current = -1
        return [self.picked(), *self.all_views(*c), self.state.notes()]

    def checkpoint(self, f, *c) -> list[Any]:
        st = self.state
        if f is None:
            raise DemoError("no checkpoint file")
        engine = DemoEngine.from_checkpoint(_path(f), st.device, labellers=st.engine.labellers)
        fresh = DemoState(engine, st.files, st.device)
        st.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "lock"})
        sliders = [self.gr.update(visible=m in engine.inputs) for m in self.share_mods]
        return [self.picked(), st.header(), *sliders, *self.all_views(*c),
                f"loaded checkpoint {os.path.basename(_path(f))}. " + st.notes()]


def build_app(state: DemoState) -> Any:
    """The gr.Blocks page for ``state`` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    share_mods = list(dict.fromkeys([*SHARE_MODALITIES, *state.engine.inputs]))
    with gr.Blocks(title="MultiMAE demos", analytics_enabled=False) as app:
        ui = _layout(state, gr, share_mods)
        h = _Handlers(state, gr, share_mods)
        c, n = ui.controls, len(ui.views) + 1
        app.load(h.guarded(h.init, n), c, [*ui.views, ui.status])
        ui.picker.input(h.guarded(h.pick, n), [ui.picker, *c], [*ui.views, ui.status])
        for button, delta in ((ui.prev, -1), (ui.next, 1)):
            button.click(h.guarded(h.step(delta), n + 1), c, [ui.picker, *ui.views, ui.status])
        ui.resample.click(h.guarded(h.resample, 3), c, [ui.imgs["random"], ui.caps["random"], ui.status])
        for demo, sliders in (("visible", [ui.visible]), ("hue", [ui.hue]), ("share", ui.shares)):
            for s in sliders:
                s.change(h.guarded(h.one(demo), 3), c, [ui.imgs[demo], ui.caps[demo], ui.status])
        ui.up_go.click(h.guarded(h.upload, n + 1), [ui.up_rgb, ui.up_depth, ui.up_sem, *c],
                       [ui.picker, *ui.views, ui.status])
        ui.up_ckpt.upload(h.guarded(h.checkpoint, n + 2 + len(ui.shares)), [ui.up_ckpt, *c],
                          [ui.picker, ui.header, *ui.shares, *ui.views, ui.status])
    app.queue(default_concurrency_limit=1)
    return app


def _path(f: Any) -> str:
    """File path of a gr.File value (a path string in Gradio >= 4, an object with .name before)."""
    if f is None:
        return ""
    return f if isinstance(f, str) else getattr(f, "path", None) or f.name


def launch(app: Any, port: int, block: bool = True) -> None:
    """Serve on 127.0.0.1:port without share links (nothing reaches the internet)."""
    app.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=not block,
               quiet=not block, show_error=False)
