"""Per-request scores from the logits the engine already computed (no second forward pass).

For one image's logits ``[K,H,W]`` (at the serving resize), on a grid subsampled to about
``GRID_PIXELS`` pixels (the logits are upsampled from a stride-4 or coarser feature map, so
the grid loses little and keeps the cost to a few reductions: under 1 ms at K = 16):

- **uncertainty**: mean pixel entropy of the softmax divided by log K (0 = every pixel
  certain, 1 = every pixel uniform).
- per pixel, a **novelty signal**: the standardised max logit (Jung et al., ICCV 2021; ``sml``):
  the pixel's max logit minus the mean max logit of retention pixels predicted as the same
  class, divided by their standard deviation; or the same standardisation of the free energy's
  negative, ``logsumexp`` (``energy``). Low = unlike the retention sets. The calibration says
  which (``Calibration.signal``; ``sml`` unless told otherwise).
- a pixel is **novel** when its signal falls below ``pixel_threshold``: the ``PIXEL_QUANTILE``
  quantile of the retention pixels' own signals.
- **novelty** (image): the mean of the image's ``TAIL`` share of lowest signals, negated
  (standardised units: 0 = as typical as an average retention pixel, 3 = three standard
  deviations below it).
- **novel_share**: the share of the image's pixels that are novel; **largest_region**: the
  share covered by its largest 8-connected region of novel pixels.
- **pooled**: the mean softmax per class over the image (for diversity when selecting,
  without a second network).

The calibration (:class:`Calibration`, ``scores-<engine>.json`` in the step folder) is measured
when a step is deployed (``ciss deploy``), on the engine deployed, over the retention sets of
the step and its ancestors at the serving resize, and stored as a step artifact through
``Store.add_artifact`` (card and manifest rewritten as a pair). A server serving a step
without one measures it in memory at load. The image thresholds (``novelty_threshold``,
``uncertainty_threshold``) are the ``IMAGE_QUANTILE`` quantile of the retention images' own
scores: an image past one looks less like the retention sets than 95 % of their images do.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("ciss.serve")

PIXEL_QUANTILE = 0.05
IMAGE_QUANTILE = 0.95
TAIL = 0.02
GRID_PIXELS = 4096  # about 64 x 64 pixels of the logits
SIGNALS = ("sml", "energy")
DEFAULT_SIGNAL = "sml"
SCORE_VERSION = 1
SCORE_KEYS = ("uncertainty", "novelty", "novel_share", "largest_region")


def artifact_name(engine: str) -> str:
    """The step artifact holding the calibration measured on ``engine``."""
    return f"scores-{engine}.json"


@dataclass
class Calibration:
    """Per-class statistics of the novelty signal on the retention sets, and thresholds.

    Attributes:
        classes: the step's classes (the index order of the statistics).
        signal: ``sml`` (max logit) or ``energy`` (logsumexp).
        mean, std: per predicted class, the raw signal's mean and standard deviation over the
            retention pixels predicted as that class (a class predicted on fewer than
            ``MIN_PIXELS`` of them takes the statistics of all pixels).
        pixel_threshold: standardised signal below which a pixel is novel.
        novelty_threshold, uncertainty_threshold: image scores past which an image is unusual.
        engine, step, images, pixels: what it was measured with.
    """

    classes: list[str]
    signal: str
    mean: list[float]
    std: list[float]
    pixel_threshold: float
    novelty_threshold: float
    uncertainty_threshold: float
    engine: str = ""
    step: int | None = None
    images: int = 0
    pixels: int = 0
    version: int = SCORE_VERSION
    quantiles: dict = field(default_factory=lambda: {
        "pixel": PIXEL_QUANTILE, "image": IMAGE_QUANTILE, "tail": TAIL})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != SCORE_VERSION:
            raise ValueError(f"not a version-{SCORE_VERSION} score calibration")
        return cls(**doc)

    def __post_init__(self) -> None:
        # per-request lookups index these (not dataclass fields: the JSON keeps the lists)
        self.mean_array = np.asarray(self.mean, np.float32)
        self.std_array = np.asarray(self.std, np.float32)


MIN_PIXELS = 50


def _grid(logits: np.ndarray) -> np.ndarray:
    """Every s-th row and column so that about ``GRID_PIXELS`` pixels remain."""
    h, w = logits.shape[-2:]
    s = max(1, int(math.sqrt(h * w / GRID_PIXELS)))
    return logits[:, ::s, ::s] if s > 1 else logits


def _parts(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per pixel of one image's logits [K,h,w]: max logit, argmax, logsumexp, entropy/log K,
    and the softmax's sum over pixels."""
    # an fp16 engine can overflow to +-inf: clip so that no score is NaN (JSON refuses NaN)
    x = np.nan_to_num(np.ascontiguousarray(logits, dtype=np.float32), nan=0.0,
                      posinf=1e4, neginf=-1e4)
    k = x.shape[0]
    arg = x.argmax(axis=0)
    top = np.take_along_axis(x, arg[None], 0)[0]
    e = np.exp(x - top[None])
    z = e.sum(axis=0)
    inv = 1.0 / z
    lse = top + np.log(z)
    # entropy = logsumexp - E_p[logit]; both without the K x H x W softmax itself
    ent = ((lse - np.einsum("khw,khw->hw", e, x) * inv) / math.log(k) if k > 1
           else np.zeros_like(top))
    return {"top": top, "arg": arg, "lse": lse, "ent": ent,
            "pooled": np.einsum("khw,hw->k", e, inv) / inv.size}


def _standardised(parts: dict, cal: Calibration) -> np.ndarray:
    raw = parts["top"] if cal.signal == "sml" else parts["lse"]
    return (raw - cal.mean_array[parts["arg"]]) / cal.std_array[parts["arg"]]


def _tail_novelty(sig: np.ndarray) -> float:
    flat = sig.ravel()
    n = max(1, int(round(flat.size * TAIL)))
    low = np.partition(flat, n - 1)[:n] if n < flat.size else flat
    return float(-low.mean())


def largest_region(mask: np.ndarray) -> int:
    """Pixels in the largest 8-connected region of ``mask``.

    Label propagation with pointer jumping (no scipy at run time): every pixel takes the
    smallest pixel index among its 8 neighbours in the mask, then follows that index's own
    label; a region converges to its smallest index in about log(diameter) rounds.
    """
    if not mask.any():
        return 0
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        pad = np.pad(lab, 1, constant_values=none)
        low = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(low, pad[dy:dy + h, dx:dx + w], out=low)
        low = np.where(mask, low, none)
        flat = low.ravel()
        inside = flat < none
        while True:  # pointer jumping: follow labels to their root
            nxt = flat.copy()
            nxt[inside] = flat[flat[inside]]
            if np.array_equal(nxt, flat):
                break
            flat = nxt
        low = flat.reshape(h, w)
        if np.array_equal(low, lab):
            break
        lab = low
    return int(np.bincount(lab[mask]).max())


def score_logits(logits: np.ndarray, calibration: Calibration | None) -> dict:
    """The scores of one image from its logits [K,H,W] (module docstring).

    Without a calibration (or one for other classes), novelty, novel_share and
    largest_region are None; uncertainty and pooled are always given.
    """
    parts = _parts(_grid(logits))
    out = {"uncertainty": round(float(parts["ent"].mean()), 6), "novelty": None,
           "novel_share": None, "largest_region": None,
           "pooled": [round(float(v), 6) for v in parts["pooled"]]}
    if calibration is not None and len(calibration.mean) == logits.shape[0]:
        sig = _standardised(parts, calibration)
        novel = sig < calibration.pixel_threshold
        n = novel.size
        out["novelty"] = round(_tail_novelty(sig), 6)
        out["novel_share"] = round(float(novel.sum()) / n, 6)
        out["largest_region"] = round(largest_region(novel) / n, 6)
    return out


def safe_scores(logits: np.ndarray, calibration: Calibration | None) -> dict | None:
    """:func:`score_logits`, or None (logged) when scoring fails: a score is never worth a
    failed request."""
    try:
        return score_logits(logits, calibration)
    except Exception as exc:  # noqa: BLE001 - the request is answered without scores
        log.warning("scoring failed (%s: %s); answered without scores", type(exc).__name__, exc)
        return None


def public(scores: dict) -> dict:
    """The scores a response carries (the pooled vector stays inside the server)."""
    return {k: scores.get(k) for k in SCORE_KEYS}


def unusual(scores: dict, calibration: Calibration | None, novelty: float | None = None,
            uncertainty: float | None = None) -> list[str]:
    """Which thresholds the scores pass, most telling first: ``novelty``, ``uncertainty``.
    ``novelty``/``uncertainty`` override the calibrated thresholds."""
    nov_t = novelty if novelty is not None else getattr(calibration, "novelty_threshold", None)
    unc_t = uncertainty if uncertainty is not None else getattr(
        calibration, "uncertainty_threshold", None)
    why = []
    if nov_t is not None and scores.get("novelty") is not None and scores["novelty"] > nov_t:
        why.append("novelty")
    if unc_t is not None and scores["uncertainty"] > unc_t:
        why.append("uncertainty")
    return why


def calibrate(run_logits, images, classes: list[str], engine: str = "",
              step: int | None = None, signal: str = DEFAULT_SIGNAL) -> Calibration:
    """Measure a :class:`Calibration` from ``run_logits(uint8 [1,3,H,W]) -> [1,K,H,W]`` over
    ``images`` (uint8 HxWx3 at the serving size).

    Raises:
        ValueError: no images, or an unknown signal.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal {signal!r}: choose {', '.join(SIGNALS)}")
    k = len(classes)
    per_image, uncs = [], []
    for image in images:
        logits = np.asarray(run_logits(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))[0])
        parts = _parts(_grid(logits))
        per_image.append(parts)
        uncs.append(float(parts["ent"].mean()))
    if not per_image:
        raise ValueError("no retention images to calibrate the novelty score on")
    key = "top" if signal == "sml" else "lse"
    raw = np.concatenate([p[key].ravel() for p in per_image])
    arg = np.concatenate([p["arg"].ravel() for p in per_image])
    g_mean, g_std = float(raw.mean()), float(raw.std()) or 1.0
    mean, std = [], []
    for c in range(k):
        vals = raw[arg == c]
        if vals.size >= MIN_PIXELS:
            mean.append(float(vals.mean()))
            std.append(float(vals.std()) or g_std)
        else:
            mean.append(g_mean)
            std.append(g_std)
    cal = Calibration(classes=list(classes), signal=signal, mean=mean, std=std,
                      pixel_threshold=0.0, novelty_threshold=0.0, uncertainty_threshold=0.0,
                      engine=engine, step=step, images=len(per_image), pixels=int(raw.size))
    sigs = [_standardised(p, cal) for p in per_image]
    cal.pixel_threshold = float(np.quantile(np.concatenate([s.ravel() for s in sigs]),
                                            PIXEL_QUANTILE))
    cal.novelty_threshold = float(np.quantile([_tail_novelty(s) for s in sigs],
                                              IMAGE_QUANTILE))
    cal.uncertainty_threshold = float(np.quantile(uncs, IMAGE_QUANTILE))
    return cal


CALIBRATION_IMAGES = 300  # at most, evenly strided: bounds what a deploy or a load adds


def retention_images(store, step: int, max_side: int, limit: int = CALIBRATION_IMAGES):
    """The retention images of ``step`` and its ancestors at the serving size (at most
    ``limit``, taken at an even stride over all of them)."""
    from ciss.data.transforms import resize_longest
    from ciss.store.retention import retention_sets

    pairs = [(folder, stem) for folder in retention_sets(store, step).values()
             for stem in folder.val]
    stride = max(1, -(-len(pairs) // limit))
    for folder, stem in pairs[::stride]:
        yield resize_longest(folder.load(stem)[0], max_side)


def measure(store, step: int, engine, engine_name: str, max_side: int | None = None,
            signal: str = DEFAULT_SIGNAL) -> Calibration:
    """Calibrate ``step`` with a loaded engine (``run`` giving logits); nothing is stored."""
    from ciss.data.transforms import SERVE_MAX_SIDE

    return calibrate(lambda x: engine.run(x)["logits"],
                     retention_images(store, step, max_side or SERVE_MAX_SIDE),
                     store.card(step).classes, engine=engine_name, step=step, signal=signal)


def calibrate_step(store, step: int, engine_name: str, device: str = "cpu",
                   max_side: int | None = None) -> Calibration:
    """Calibrate ``step`` on ``engine_name`` and store it as its ``scores-<engine>.json``
    (replacing an older one; card and manifest rewritten as a pair)."""
    from ciss.engines.load import load_engine, ort_providers

    engine = load_engine(store, step, engine_name, ort_providers(device), device=device)
    cal = measure(store, step, engine, engine_name, max_side)
    text = cal.to_json()
    store.add_artifact(step, artifact_name(engine_name),
                       lambda p: p.write_text(text, encoding="utf-8"))
    return cal


def stored_calibration(store, step: int, engine_name: str) -> Calibration | None:
    """The step's verified calibration for ``engine_name`` and its classes, else None."""
    card = store.card(step)
    name = artifact_name(engine_name)
    if name not in card.artifacts:
        return None
    try:
        cal = Calibration.from_json((Path(store.step_dir(step)) / name).read_text("utf-8"))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("step %d: unreadable %s (%s); scored as uncalibrated", step, name, exc)
        return None
    if cal.classes != list(card.classes):
        return None
    return cal
