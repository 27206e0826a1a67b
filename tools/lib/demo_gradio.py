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


def build_app(state: DemoState) -> Any:
    """The gr.Blocks page for ``state`` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    e = state.engine
    share_mods = list(dict.fromkeys([*SHARE_MODALITIES, *e.inputs]))
    with gr.Blocks(title="MultiMAE demos", analytics_enabled=False) as app:
        gr.Markdown("# MultiMAE: masked multi-modal reconstruction, computed live")
        header = gr.Markdown(state.header(), elem_id="header")
        with gr.Row():
            picker = gr.Dropdown(state.choices(), value=state.choice(), label="image", elem_id="image")
            prev_b = gr.Button("previous image", elem_id="prev")
            next_b = gr.Button("next image", elem_id="next")
        with gr.Accordion("upload an image (optional depth and semseg files) or another checkpoint", open=True):
            with gr.Row():
                up_rgb = gr.File(label="RGB image", elem_id="upload_rgb")
                up_depth = gr.File(label="depth (16-bit PNG, same size)", elem_id="upload_depth")
                up_sem = gr.File(label="semseg (class-id PNG, same size)", elem_id="upload_semseg")
                up_ckpt = gr.File(label="checkpoint (.pth / .safetensors)", elem_id="upload_ckpt")
            up_go = gr.Button("use uploaded image", elem_id="upload_go")
        status = gr.Markdown(state.notes(), elem_id="status")
        imgs, caps = {}, {}
        with gr.Tabs():
            for demo in DEMOS:
                with gr.Tab(TITLES[demo], elem_id=f"tab_{demo}"):
                    if demo == "random":
                        resample = gr.Button("resample mask", elem_id="resample")
                    elif demo == "visible":
                        steps = e.visible_steps()
                        visible = gr.Slider(steps[0], steps[-1], value=min(steps, key=lambda s: abs(
                            s - e.cfg.num_encoded_tokens)), step=steps[1] - steps[0] if len(steps) > 1 else 1,
                            label="visible tokens", elem_id="visible_n")
                    elif demo == "share":
                        shares = [gr.Slider(0, SHARE_LEVELS - 1, value=1, step=1, label=f"{m} weight",
                                            elem_id=f"share_{m}", visible=m in e.inputs) for m in share_mods]
                    else:
                        hue = gr.Slider(HUE_STEPS[0], HUE_STEPS[-1], value=0.3, step=0.1, label="hue shift",
                                        elem_id="hue_shift")
                    caps[demo] = gr.Markdown(elem_id=f"{demo}_caption")
                    imgs[demo] = gr.Image(type="numpy", format="png", interactive=False, label=TITLES[demo],
                                          elem_id=f"{demo}_img")
        controls = [visible, hue, *shares]
        views = [x for d in DEMOS for x in (imgs[d], caps[d])]

        def read(v, h, *ws) -> dict[str, Any]:
            return {"visible": v, "hue": h, "share": dict(zip(share_mods, ws))}

        def all_views(*c) -> list[Any]:
            return [x for d in DEMOS for x in state.render(d, read(*c))]

        def guarded(fn: Callable[..., list[Any]], n_out: int) -> Callable[..., list[Any]]:
            def run(*args):
                with state.lock:
                    try:
                        return fn(*args)
                    except Exception as err:  # noqa: BLE001 -- the page shows one sentence, never a traceback
                        msg = err.args[0] if isinstance(err, DemoError) and err.args else f"{type(err).__name__}: {err}"
                        return [gr.update()] * (n_out - 1) + [f"**Error:** {msg}"]
            return run

        def one(demo: str):
            return guarded(lambda *c: [*state.render(demo, read(*c)), gr.update()], 3)

        def pick(choice, *c):
            names = state.choices()
            state.current = -1 if choice.startswith(UPLOAD) else names.index(choice) if choice in names else 0
            return [*all_views(*c), state.notes()]

        def step(delta: int):
            def go(*c):
                state.current = (max(state.current, 0) + delta) % len(state.samples) if state.samples else -1
                return [gr.update(choices=state.choices(), value=state.choice()), *all_views(*c), state.notes()]
            return go

        def resample_fn(*c):
            state.seed += 1
            return [*state.render("random", read(*c)), gr.update()]

        def upload_fn(rgb, depth, sem, *c):
            if rgb is None:
                raise DemoError("choose an RGB image file first")
            files = {"rgb": _path(rgb), "depth": _path(depth), "semseg": _path(sem)}
            state.upload = state.engine.load_sample(files, name=os.path.basename(files["rgb"]))
            state.current = -1
            return [gr.update(choices=state.choices(), value=state.choice()), *all_views(*c), state.notes()]

        def ckpt_fn(f, *c):
            if f is None:
                return [gr.update()] * (len(views) + len(shares) + 2) + [state.notes()]
            engine = DemoEngine.from_checkpoint(_path(f), state.device, labellers=state.engine.labellers)
            fresh = DemoState(engine, state.files, state.device)
            state.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "lock"})
            sliders = [gr.update(visible=m in engine.inputs) for m in share_mods]
            return [gr.update(choices=state.choices(), value=state.choice()), state.header(), *sliders,
                    *all_views(*c), f"loaded checkpoint {os.path.basename(_path(f))}. " + state.notes()]

        n_views = len(views) + 1
        app.load(guarded(lambda *c: [*all_views(*c), state.notes()], n_views), controls, [*views, status])
        picker.input(guarded(pick, n_views), [picker, *controls], [*views, status])
        for button, delta in ((prev_b, -1), (next_b, 1)):
            button.click(guarded(step(delta), n_views + 1), controls, [picker, *views, status])
        resample.click(guarded(resample_fn, 3), controls, [imgs["random"], caps["random"], status])
        visible.change(one("visible"), controls, [imgs["visible"], caps["visible"], status])
        hue.change(one("hue"), controls, [imgs["hue"], caps["hue"], status])
        for s in shares:
            s.change(one("share"), controls, [imgs["share"], caps["share"], status])
        up_go.click(guarded(upload_fn, n_views + 1), [up_rgb, up_depth, up_sem, *controls],
                    [picker, *views, status])
        up_ckpt.upload(guarded(ckpt_fn, n_views + 2 + len(shares)), [up_ckpt, *controls],
                       [picker, header, *shares, *views, status])
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
