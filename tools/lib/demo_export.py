"""The four demos as one self-contained static page: every picture precomputed, no server needed.

``export_page`` renders, for every sample, the picture of every control position of every demo
(``DemoEngine.positions``), stores each distinct PNG once as a data URI inside ``index.html`` and adds a
few lines of JavaScript that swap pictures when a slider moves. The page opens from the file system
or any static host. Element ids match the live app (``<demo>_img``, ``visible_n``, ``share_<m>``,
``hue_shift``, ``image``, ``prev``, ``next``, ``resample``) so one browser test drives both.
"""
from __future__ import annotations

import base64
import html
import json
import os
import sys
import time
from typing import Any, Sequence, TextIO

from tools.lib.demo_engine import DEMOS, SHARE_LEVELS, TITLES, DemoEngine, DemoError, Sample


def progress(done: int, total: int, start: float, stream: TextIO = sys.stderr, width: int = 30) -> None:
    """One console progress bar line, redrawn in place: [#####.....] 12/48 pictures, 3.1 s."""
    filled = int(width * done / max(total, 1))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} pictures, {time.time() - start:.1f} s")
    if done >= total:
        stream.write("\n")
    stream.flush()


def render_all(engine: DemoEngine, samples: Sequence[Sample], num_random: int = 4,
               stream: TextIO = sys.stderr) -> dict[str, Any]:
    """The page's data: {'pool': [data URIs], 'images': [{name, notes, views: {demo: [pool index or
    None]}, captions: {demo: [text]}}], 'positions': {demo: [values]}, ...}."""
    from utils.io import encode_png

    positions = {d: engine.positions(d, num_random) for d in DEMOS}
    total = len(samples) * sum(len(p) for p in positions.values())
    pool: list[str] = []
    index: dict[str, int] = {}
    images, done, start = [], 0, time.time()
    for s in samples:
        views: dict[str, list[int | None]] = {}
        captions: dict[str, list[str]] = {}
        for demo in DEMOS:
            views[demo], captions[demo] = [], []
            for value in positions[demo]:
                try:
                    grid, caption = engine.view(s, demo, value)
                    uri = "data:image/png;base64," + base64.b64encode(encode_png(grid)).decode()
                    views[demo].append(index.setdefault(uri, len(pool)))
                    if views[demo][-1] == len(pool):
                        pool.append(uri)
                except DemoError as e:
                    views[demo].append(None)
                    caption = f"Not available: {e}"
                captions[demo].append(caption)
                done += 1
                progress(done, total, start, stream)
        images.append({"name": s.name, "notes": s.notes, "views": views, "captions": captions})
    why = engine.unsupported()
    return {"pool": pool, "images": images, "positions": positions, "inputs": engine.inputs,
            "share_levels": SHARE_LEVELS, "titles": TITLES, "unsupported": {TITLES[d]: w for d, w in why.items()}}


_STYLE = """body{font-family:sans-serif;margin:1em;max-width:1800px}img.view{width:100%;image-rendering:pixelated}
.tabs button{padding:.4em 1em;margin-right:.3em}.tabs button.on{font-weight:bold;border-bottom:3px solid #e60}
.panel{display:none;margin-top:1em}.panel.on{display:block}label{margin-right:1.5em}.note{color:#555}"""

_SCRIPT = """const D=JSON.parse(document.getElementById('data').textContent);let cur=0,seed=0;
const $=id=>document.getElementById(id);
function show(demo,i){const im=D.images[cur],k=im.views[demo][i],el=$(demo+'_img');
 if(k===null){el.removeAttribute('src');el.style.display='none'}else{el.src=D.pool[k];el.style.display=''}
 $(demo+'_caption').textContent=im.captions[demo][i];}
function shareIndex(){const w=D.inputs.map(m=>+$('share_'+m).value);
 const i=D.positions.share.findIndex(p=>D.inputs.every((m,j)=>p[m]===w[j]));return i}
function update(){const im=D.images[cur];$('notes').textContent=im.name+': '+(im.notes.join('; ')||'all modalities given');
 show('random',seed%D.positions.random.length);show('visible',+$('visible_n').value);
 const si=shareIndex();if(si<0){$('share_img').style.display='none';$('share_caption').textContent='Not available: every weight is 0'}else show('share',si);
 show('hue',+$('hue_shift').value);
 $('visible_label').textContent=D.positions.visible[+$('visible_n').value];
 $('hue_label').textContent=D.positions.hue[+$('hue_shift').value].toFixed(2);}
function pick(i){cur=(i+D.images.length)%D.images.length;$('image').value=cur;update()}
function tab(d){document.querySelectorAll('.tabs button').forEach(b=>b.classList.toggle('on',b.id==='tab_'+d));
 document.querySelectorAll('.panel').forEach(p=>p.classList.toggle('on',p.id==='panel_'+d))}
$('image').onchange=e=>pick(+e.target.value);$('prev').onclick=()=>pick(cur-1);$('next').onclick=()=>pick(cur+1);
$('resample').onclick=()=>{seed++;update()};
document.querySelectorAll('input[type=range]').forEach(r=>r.oninput=update);
document.querySelectorAll('.tabs button').forEach(b=>b.onclick=()=>tab(b.id.slice(4)));
tab('random');pick(0);"""


def page_html(data: dict[str, Any], title: str = "MultiMAE demos") -> str:
    """The whole page: data as JSON in a script tag, controls, one panel per demo."""
    pos = data["positions"]
    options = "".join(f'<option value="{i}">{i}: {html.escape(im["name"])}</option>'
                      for i, im in enumerate(data["images"]))
    mid = lambda n: n // 2  # noqa: E731 -- sliders start in the middle of their range
    shares = "".join(f'<label>{m} weight <input type="range" id="share_{m}" min="0" max="{data["share_levels"] - 1}" '
                     f'step="1" value="1"></label>' for m in data["inputs"])
    controls = {
        "random": '<button id="resample">resample mask</button>',
        "visible": f'<label>visible tokens <span id="visible_label"></span> <input type="range" id="visible_n" '
                   f'min="0" max="{len(pos["visible"]) - 1}" step="1" value="{mid(len(pos["visible"]))}"></label>',
        "share": shares,
        "hue": f'<label>hue shift <span id="hue_label"></span> <input type="range" id="hue_shift" min="0" '
               f'max="{len(pos["hue"]) - 1}" step="1" value="{len(pos["hue"]) - 3}"></label>'}
    tabs = "".join(f'<button id="tab_{d}">{html.escape(data["titles"][d])}</button>' for d in DEMOS)
    panels = "".join(f'<div class="panel" id="panel_{d}">{controls[d]}<p id="{d}_caption"></p>'
                     f'<img class="view" id="{d}_img" alt="{d}"></div>' for d in DEMOS)
    why = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in data["unsupported"].items())
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="note">Precomputed pictures: masked input, prediction with the visible patches pasted back, '
            f'and reference for every modality.</p>{"<p>This checkpoint cannot run:</p><ul>" + why + "</ul>" if why else ""}'
            f'<p><select id="image">{options}</select> <button id="prev">previous image</button> '
            f'<button id="next">next image</button> <span id="notes" class="note"></span></p>'
            f'<div class="tabs">{tabs}</div>{panels}<script type="application/json" id="data">{blob}</script>'
            f"<script>{_SCRIPT}</script></body></html>")


def export_page(engine: DemoEngine, samples: Sequence[Sample], out_dir: str, num_random: int = 4,
                stream: TextIO = sys.stderr) -> str:
    """Render everything, write ``out_dir/index.html`` atomically, return its path."""
    from utils.io import atomic_open

    if not samples:
        raise DemoError("nothing to export: no images (pass --data_path with an rgb/ folder)")
    page = page_html(render_all(engine, samples, num_random, stream))
    path = os.path.join(out_dir, "index.html")
    with atomic_open(path, "w", fsync=False) as f:
        f.write(page)
    return path
