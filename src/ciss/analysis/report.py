"""The diagnosis as a self-contained HTML page (plots embedded as PNG) plus its JSON."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ciss.errors import CissError

PALETTE = {"kept": "#2e7d32", "to_background": "#9e9e9e", "to_new": "#c62828",
           "to_old": "#f9a825"}


def png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG (for ``data:`` URIs: pages embed their plots)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(d: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(d["classes"])
    out = {}
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * (d["classes"][n]["iou_before"] or 0) for n in names],
           0.4, label=f"step {d['against']} (before)", color="#1565c0")
    ax.bar([i + 0.2 for i in x], [100 * (d["classes"][n]["iou_after"] or 0) for n in names],
           0.4, label=f"step {d['step']} (after)", color="#ef6c00")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU %")
    ax.legend(fontsize=8)
    out["iou"] = png_base64(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(names))))
    left = [0.0] * len(names)
    for key, colour in PALETTE.items():
        vals = [d["classes"][n][key] or 0.0 for n in names]
        ax.barh(names, vals, left=left, color=colour, label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)
    ax.set_xlabel("share of the class's ground-truth pixels (child's prediction)")
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    out["destinations"] = png_base64(fig)
    plt.close(fig)

    stages = list(d["cka"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
    a1.plot(stages, [d["cka"][s] if d["cka"][s] is not None else float("nan") for s in stages],
            marker="o")
    a1.set_ylim(0, 1.05)
    a1.set_title("linear CKA, parent vs child", fontsize=9)
    gains = [d["transplant_gain"][s] if d["transplant_gain"][s] is not None else 0.0
             for s in stages]
    a2.bar(stages, gains, color=["#bdbdbd" if s in d["frozen"] else "#6a1b9a" for s in stages])
    a2.set_title("old-class mIoU gained by putting back the parent's stage (points)", fontsize=9)
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    out["stages"] = png_base64(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, kind in zip(axes, ("new", "background")):
        c = d["bias"]["offset"][kind]
        for key, label in (("old_miou", "old classes"), ("new_miou", "new classes")):
            ax.plot(c["offsets"], [100 * v if v is not None else float("nan") for v in c[key]],
                    marker=".", label=label)
        ax.axvline(c["best_offset"], color="#9e9e9e", linestyle="--")
        ax.set_title(f"{kind} logits lowered by an offset", fontsize=9)
        ax.set_xlabel("offset (logit units)")
        ax.set_ylabel("mIoU %")
        ax.legend(fontsize=8)
    out["offsets"] = png_base64(fig)
    plt.close(fig)
    return out


def _fmt(v, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(d: dict) -> str:
    """The report page for a diagnosis JSON document."""
    plots = _plots(d)
    img = {k: f'<img alt="{k}" src="data:image/png;base64,{v}">' for k, v in plots.items()}
    rows = [[n, _fmt(c["iou_before"]), _fmt(c["iou_after"]), _fmt(c["kept"]),
             _fmt(c["to_background"]), _fmt(c["to_new"]), _fmt(c["to_old"]), c["flipped"]]
            for n, c in d["classes"].items()]
    classes = _table(["old class", "IoU before %", "IoU after %", "kept %", "-> background %",
                      "-> new %", "-> other old %", "flipped px"], rows)
    bias = d["bias"]
    logit_rows = [[k, f"{v:.2f}"] for k, v in bias["mean_logit"].items()]
    norm_rows = [[who, g, _fmt(v, pct=False)] for who, groups in bias["weight_norm"].items()
                 for g, v in groups.items()]
    off_rows = [[k, f"{c['best_offset']:g}", "-" if c["old_miou_gain"] is None else
                 f"{c['old_miou_gain']:+.1f}", "-" if c["new_miou_cost"] is None else
                 f"{-c['new_miou_cost']:+.1f}"] for k, c in bias["offset"].items()]
    stage_rows = [[s, _fmt(d["cka"][s], pct=False), _fmt(d["transplant"][s]),
                   "frozen/unchanged" if s in d["frozen"] else
                   ("-" if d["transplant_gain"][s] is None else f"{d['transplant_gain'][s]:+.1f}")]
                  for s in d["cka"]]
    lost = d["lost"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ciss diagnosis: step {d['step']} vs {d['against']}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.verdict {{ background: #fff8e1; border-left: 4px solid #f9a825; padding: 0.8em 1em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Why did step {d['step']} forget? (vs step {d['against']})</h1>
<p>{html.escape(d['arch'])}, method {html.escape(d['method'])}; {d['images']} images from
{html.escape(d['data'])}; {d['seconds']} s.</p>
<p class="verdict">{html.escape(d['verdict'])}</p>
<h2>Per-class IoU</h2>{img['iou']}
<h2>Where each old class's pixels went</h2>
<p>Lost pixels (the parent got them right, the child does not): {lost['pixels']};
{_fmt(lost['to_background'])}% now background, {_fmt(lost['to_new'])}% a new class,
{_fmt(lost['to_old'])}% another old class.</p>
{img['destinations']}{classes}
<h2>Stage by stage</h2>{img['stages']}
{_table(["stage", "CKA", "old mIoU with parent's stage %", "gain (points)"], stage_rows)}
<h2>Bias between class groups</h2>
{_table(["model/group", "mean logit"], logit_rows)}
{_table(["model", "group", "classifier weight norm"], norm_rows)}
{img['offsets']}
{_table(["logits lowered", "best offset", "old mIoU change", "new mIoU change"], off_rows)}
<p>Offsets are chosen on these same images (in-sample): they show how much accuracy a bias holds,
not a tuned deployment setting.</p>
</body></html>
"""


def write_report(diagnosis, out: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``diagnosis.json`` into ``out`` (created; must be new or empty).

    Raises:
        CissError: ``out`` exists and is not empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CissError(f"{out}: exists and is not empty; choose a new --out folder")
    doc = diagnosis.to_json()
    page = render_html(doc)
    out.mkdir(parents=True, exist_ok=True)
    tmp_json, tmp_html = out / ".diagnosis.json.tmp", out / ".report.html.tmp"
    tmp_json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp_html.write_text(page, encoding="utf-8")
    tmp_json.replace(out / "diagnosis.json")
    tmp_html.replace(out / "report.html")
    return out / "report.html", out / "diagnosis.json"
