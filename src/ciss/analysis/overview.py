"""The store at a glance: every step as a timeline, per-class IoU across steps as a heat map,
the deployment history (deployed, refused, forced, rolled back) and the diagnosis reports.

``ciss report`` writes it as one self-contained ``index.html`` (plots embedded, nothing loaded
from the network); ``ciss serve`` answers it at ``GET /`` with an upload form that segments an
image through ``/v1/segment`` and draws the mask over it.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ciss.analysis.report import png_base64
from ciss.analysis.tolerances import shown_reasons
from ciss.errors import CissError
from ciss.store import Store
from ciss.store.retention import ancestors


@dataclass
class Overview:
    """What the page shows, as plain data (also ``overview.json``).

    Attributes:
        store: the store's folder.
        steps: one dict per step: step, parent, method, arch, new_classes, deployed, warnings.
        classes: every class, in the order steps introduced them (background first).
        introduced: class -> the step that introduced it (whose retention set labels it).
        iou: str(step) -> class -> IoU on that class's own retention set (None: not scored).
        deployed: ``deployed.json`` (None when nothing is deployed).
        events: the store's event log, newest first.
        shadow: the running server's live retention watch (``ciss serve`` fills it).
    """

    store: str
    steps: list[dict]
    classes: list[str]
    introduced: dict[str, int]
    iou: dict[str, dict[str, float | None]]
    deployed: dict | None
    events: list[dict]
    shadow: dict | None = field(default=None)


def build_overview(store: Store) -> Overview:
    """Read every card, ``deployed.json`` and the event log.

    Raises:
        CissError: the store has no steps.
    """
    steps = store.steps()
    if not steps:
        raise CissError(f"{store.root}: no steps yet; next: ciss train --data DIR")
    deployed = store.deployed()
    live = deployed.get("step") if deployed else None
    rows, classes, introduced, iou = [], [], {}, {}
    for n in steps:
        card = store.card(n)
        for name in card.classes:
            if name not in introduced:
                introduced[name] = n
                classes.append(name)
        # each class on the retention set of the step of its own line that introduced it
        # (siblings may introduce the same name independently)
        origin: dict[str, int] = {}
        for s in ancestors(store, n):
            for c in store.card(s).new_classes:
                origin.setdefault(c, s)
        rows.append({"step": n, "parent": card.parent, "method": card.method, "arch": card.arch,
                     "origin": origin,
                     "new_classes": list(card.new_classes), "deployed": n == live,
                     "frozen": card.frozen[-1] if card.frozen else None,
                     "warnings": [w["name"] for w in card.extra.get("learning", {})
                                  .get("warnings", [])]})
        iou[str(n)] = {c: card.retention.get(str(origin.get(c, introduced[c])), {})
                       .get("torch", {}).get(c) for c in card.classes if c != "background"}
    return Overview(str(store.root), rows, classes, introduced, iou, deployed,
                    list(reversed(store.events())))


def _heatmaps(ov: Overview) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [c for c in ov.classes if c != "background"]
    steps = [str(r["step"]) for r in ov.steps]
    grid = np.full((len(names), len(steps)), np.nan)
    for j, s in enumerate(steps):
        for i, c in enumerate(names):
            v = ov.iou[s].get(c)
            if v is not None:
                grid[i, j] = 100 * v
    drift = np.full_like(grid, np.nan)
    for i, c in enumerate(names):
        for j, r in enumerate(ov.steps):  # drift along each step's own line
            first = r["origin"].get(c)
            if first is not None and str(first) in steps:
                drift[i, j] = grid[i, j] - grid[i, steps.index(str(first))]
    out = {}
    size = (max(4.0, 0.9 * len(steps) + 2.5), max(2.5, 0.28 * len(names) + 1))
    for key, data, cmap, lo, hi, label in (
            ("iou", grid, "viridis", 0, 100, "IoU % on the class's retention set"),
            ("drift", drift, "RdBu", -30, 30, "points since the step that introduced it")):
        fig, ax = plt.subplots(figsize=size)
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(steps)), [f"step {s}" + (" *" if r["deployed"] else "")
                                          for s, r in zip(steps, ov.steps)], fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, f"{v:+.0f}" if key == "drift" else f"{v:.0f}", ha="center",
                        va="center", fontsize=6, color="white" if key == "iou" and v < 55
                        else "black")
        fig.colorbar(im, ax=ax, label=label, shrink=0.8)
        out[key] = png_base64(fig)
        plt.close(fig)
    return out


def _event_row(e: dict, base: Path | None) -> str:
    kind = e.get("kind", "?")
    what = {"deployed": "deployed", "refused": "REFUSED", "forced": "FORCED past the gate",
            "rolled_back": "rolled back", "diagnosed": "diagnosed",
            "alarm": "ALARM", "collecting": "collecting traffic",
            "exported": "exported for annotation"}.get(kind, kind)
    step = e.get("step")
    detail = ""
    if kind in ("refused", "forced", "deployed"):
        detail = shown_reasons(e.get("reasons", []), step)
        if e.get("mean_old_drop") is not None:
            detail = f"mean old-class drop {e['mean_old_drop']:.1f} pts" + (
                f"; {detail}" if detail else "")
    elif kind == "alarm":
        detail = e.get("reason", "")
    elif kind == "collecting":
        detail = f"into {e.get('folder', '')} (random share {e.get('random_share')})"
    elif kind == "exported":
        detail = (f"{e.get('tasks')} image(s) of {e.get('folder', '')} ({e.get('rule')}) as "
                  f"{e.get('format')} into {e.get('out', '')}; labels "
                  f"{', '.join(e.get('labels') or [])}")
    elif kind == "rolled_back":
        detail = f"from step {e.get('rolled_back_from')}" + (
            f": {e['reason']}" if e.get("reason") else "")
    elif kind == "diagnosed":
        report = e.get("report", "")
        href = os.path.relpath(report, base) if base and report else report
        link = (f'<a href="{html.escape(href)}">report</a>' if base and Path(report).exists()
                else html.escape(report))
        detail = f"vs step {e.get('against')}: {html.escape(e.get('verdict', ''))} ({link})"
        return (f"<tr class='{kind}'><td>{html.escape(e.get('at', ''))}</td><td>{what}</td>"
                f"<td>{step}</td><td>{html.escape(e.get('by', ''))}</td><td>{detail}</td></tr>")
    return (f"<tr class='{kind}'><td>{html.escape(e.get('at', ''))}</td><td>{what}</td>"
            f"<td>{step}</td><td>{html.escape(e.get('by', ''))}</td>"
            f"<td>{html.escape(detail)}</td></tr>")


def _collected(ov: Overview) -> str:
    """The newest collection a server wrote (its ``collecting`` event): counts and a contact
    sheet of the newest images kept, with why each was kept."""
    from ciss.data.collection import contact_sheet, is_collection, summarise

    folder = next((e.get("folder") for e in ov.events if e.get("kind") == "collecting"), None)
    if not folder or not is_collection(Path(folder)):
        return ""
    try:
        doc = summarise(Path(folder))
        sheet = contact_sheet(Path(folder))
    except (CissError, OSError) as exc:
        return f"<h2>Collected from live traffic</h2><p>{html.escape(folder)}: {exc}</p>"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(doc["reasons"].items())) or "none"
    cells = "".join(
        f"<figure style='display:inline-block;margin:4px;width:110px;font-size:0.7em'>"
        f"<img alt='{html.escape(t['id'])}' src='data:image/png;base64,{t['png']}'>"
        f"<figcaption>{html.escape(t['caption'])}</figcaption></figure>" for t in sheet)
    return (f"<h2>Collected from live traffic</h2><p>{html.escape(folder)}: {doc['items']} "
            f"image(s), {doc['bytes'] / 1e6:.1f} MB; kept for {html.escape(reasons)}. Newest "
            f"first; <code>ciss collect export {html.escape(folder)} --budget N --format "
            f"label-studio --new-class NAME --out DIR</code> hands them to annotators.</p>"
            f"<div>{cells}</div>")


def _timeline(ov: Overview) -> str:
    items = []
    for r in ov.steps:
        badges = []
        if r["deployed"]:
            badges.append('<span class="live">LIVE</span>')
        if r["warnings"]:
            badges.append(f'<span class="warn">not learned: '
                          f'{html.escape(", ".join(r["warnings"]))}</span>')
        parent = "" if r["parent"] is None else f" &larr; step {r['parent']}"
        added = ", ".join(r["new_classes"])
        items.append(f'<li><b>step {r["step"]}</b>{parent} &middot; {html.escape(r["method"])}'
                     f' ({html.escape(r["arch"])}, frozen up to {r["frozen"] or "none"})'
                     f' &middot; +{len(r["new_classes"])}: {html.escape(added)} '
                     + " ".join(badges) + "</li>")
    return "<ol class='timeline'>" + "".join(items) + "</ol>"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _shadow(ov: Overview) -> str:
    if not ov.shadow:
        return ""
    s = ov.shadow
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{v['pixels']}</td><td>{_pct(v['agreement'])}</td>"
        f"<td>{_pct(v['to_background'])}</td><td>{_pct(v['to_new'])}</td>"
        f"<td>{_pct(v['to_old'])}</td></tr>"
        for c, v in s.get("classes", {}).items())
    return (f"<h2>Live retention watch</h2><p>Serving step {s.get('step')} shadowed by its "
            f"parent step {s.get('parent')} on {s.get('samples', 0)} requests "
            f"(window {s.get('window')}, alarm below {s.get('min_agreement')}): "
            f"{html.escape(str(s.get('status', '')))}</p><table><tr><th>old class</th>"
            "<th>parent's pixels</th><th>agreement %</th><th>&rarr; background %</th>"
            f"<th>&rarr; new %</th><th>&rarr; other old %</th></tr>{rows}</table>")


UPLOAD = """<h2>Try it</h2>
<p><input type="file" id="file" accept="image/*"> <span id="status"></span></p>
<canvas id="view"></canvas><div id="legend"></div>
<script>
const PALETTE = %s;
document.getElementById('file').addEventListener('change', async (ev) => {
  const file = ev.target.files[0]; if (!file) return;
  const status = document.getElementById('status');
  status.textContent = 'segmenting...';
  const reply = await fetch('/v1/segment?format=json', {method: 'POST', body: file,
    headers: {'Content-Type': file.type || 'application/octet-stream'}});
  const doc = await reply.json();
  if (!reply.ok) { status.textContent = doc.error; return; }
  const img = await createImageBitmap(file);
  const canvas = document.getElementById('view');
  canvas.width = doc.width; canvas.height = doc.height;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0, doc.width, doc.height);
  const px = ctx.getImageData(0, 0, doc.width, doc.height);
  for (let y = 0; y < doc.height; y++) for (let x = 0; x < doc.width; x++) {
    const c = doc.labels[y][x]; if (c === 0) continue;
    const i = 4 * (y * doc.width + x), k = 3 * c;
    for (let j = 0; j < 3; j++) px.data[i + j] = (px.data[i + j] + PALETTE[k + j]) / 2;
  }
  ctx.putImageData(px, 0, 0);
  document.getElementById('legend').innerHTML = Object.entries(doc.pixels)
    .filter(([name]) => name !== 'background').map(([name, n]) => {
      const k = 3 * doc.classes.indexOf(name);
      return `<span class="key" style="background:rgb(${PALETTE[k]},${PALETTE[k + 1]},` +
             `${PALETTE[k + 2]})"></span>${name} (${n} px)`; }).join(' ');
  status.textContent = `step ${doc.step}: ${Object.keys(doc.pixels).length} classes`;
});
</script>"""


def render_overview(ov: Overview, *, base: Path | None = None, upload: bool = False) -> str:
    """The page. ``base``: the folder the page is written to (diagnosis links are relative to
    it); ``upload``: add the form that segments an image through ``/v1/segment``."""
    from ciss.data.imageio import voc_palette

    plots = _heatmaps(ov)
    dep = ov.deployed or {}
    live = (f"step {dep.get('step')} on {dep.get('engine')}"
            + (" (FORCED past a failing gate)" if dep.get("forced") else "")
            if dep else "nothing deployed")
    events = "".join(_event_row(e, base) for e in ov.events[:200]) or (
        "<tr><td colspan=5>no deployments yet</td></tr>")
    form = UPLOAD % json.dumps(voc_palette()) if upload else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ciss store: {html.escape(ov.store)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
.live {{ background: #2e7d32; color: white; padding: 0 6px; border-radius: 3px; }}
.warn {{ background: #fff3e0; color: #e65100; padding: 0 6px; border-radius: 3px; }}
tr.refused td, tr.alarm td {{ background: #ffebee; }} tr.forced td {{ background: #fff8e1; }}
.key {{ display: inline-block; width: 0.9em; height: 0.9em; margin: 0 4px 0 10px; }}
img, canvas {{ max-width: 100%; }}
</style></head><body>
<h1>ciss store</h1>
<p>{html.escape(ov.store)}: {len(ov.steps)} steps, {len(ov.classes) - 1} classes over all steps
(background not counted); live:
<b>{html.escape(live)}</b></p>
<h2>Steps</h2>{_timeline(ov)}
<h2>Per-class IoU across steps</h2>
<p>Each class on its own retention set (the held-out images of the step that introduced it);
* marks the deployed step.</p>
<img alt="per-class IoU across steps" src="data:image/png;base64,{plots['iou']}">
<h2>Drift since each class was introduced</h2>
<img alt="drift since introduced" src="data:image/png;base64,{plots['drift']}">
{_shadow(ov)}
{_collected(ov)}
<h2>Deployments, refusals, rollbacks, diagnoses</h2>
<table><tr><th>when (UTC)</th><th>what</th><th>step</th><th>by</th><th>details</th></tr>
{events}</table>
{form}
</body></html>
"""


def write_overview(store: Store, out: Path) -> Path:
    """Write ``index.html`` and ``overview.json`` into ``out`` (created if needed)."""
    ov = build_overview(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(render_overview(ov, base=out.resolve()), encoding="utf-8")
    (out / "overview.json").write_text(json.dumps(ov.__dict__, indent=1, default=str))
    return page
