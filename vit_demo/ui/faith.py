"""How far a map can be trusted, on the page: the score of the map shown, the `/faithfulness` endpoint, and every
method side by side.

The score is `Classifier.faithfulness` (deletion and insertion, Petsiuk et al. 2018, per patch; see
`vit_demo/faithfulness.py`), computed only when asked for: it costs tens to hundreds of forward passes, shown as
progress. The random-order baseline is kept per photo and class by the Classifier, so a second method on the
same photo costs less. The map's score is emptied whenever the map is drawn again; the comparison when the
photo or the model changes.

Public endpoint: `/faithfulness` (image, method, target, model, layer, head, head_fusion, discard_ratio) -> JSON.
"""

from __future__ import annotations

import base64
import html
import io

import gradio as gr
import pandas as pd
from PIL import Image

from ..explain import DEFAULT_DISCARD_RATIO, METHOD_TABLE
from . import checks, fair, figures
from .classify import percent
from .common import DAMAGED, Shared, gpu, relay
from .guard import photo_crop
from .maps import MapRequest, attending, parse

# The methods the comparison draws, with the names of its tiles: every method of the table that draws one map.
COMPARED = {name: m.label.split(":")[0].split(" (one layer)")[0] for name, m in METHOD_TABLE.items() if not m.panels}
HEADS = ("Faithfulness scores one map, and this method draws one per head: pick 'Class-token attention (one layer)' "
         "and a head to score one.")
CURVES = {  # curve -> colour: this map's in strong colours, the random order's in pale ones
    "deletion": "#d62728",
    "insertion": "#1f77b4",
    "deletion, random order": "#f2a7a7",
    "insertion, random order": "#a9c9e6",
}
X, Y = "patches changed (%)", "probability"
ABOUT = (
    "How far can this map be trusted? Its patches are hidden, most relevant first, and revealed over a blurred "
    "copy, while the class's probability is watched; a random order is the baseline."
)
COMPARE_ABOUT = (
    "Every method's map of this photo for the class to explain, each scored the same way (layer, head and options "
    "as set above). It costs forward passes: a few seconds on a CPU for a large model."
)
ROOM = "min-height: 64px;"  # the progress bar shows in these components while they are empty
SMALL_CSS = "font-size: 0.85em; opacity: 0.85;"
SCORES_CSS = ROOM + """
p {margin: 0 0 0.6em}
.legend {display: flex; flex-wrap: wrap; gap: 2px 14px; font-size: 0.85em; margin-top: 0.4em}
.legend i {display: inline-block; width: 14px; height: 4px; border-radius: 2px; vertical-align: middle; margin-right: 5px}
"""
TILES_CSS = ROOM + """
.tiles {display: grid; grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); gap: 10px}
figure {margin: 0}
img {width: 100%; height: auto; display: block; border-radius: 4px}
figcaption {font-size: 0.85em; margin-top: 4px; line-height: 1.35}
"""


def score(req: MapRequest, progress=None) -> dict:
    """`Classifier.faithfulness` for a checked request, progress reported in forward passes."""
    if req.method == "heads":
        raise checks.refusal(HEADS)

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Scoring the map: forward passes", unit="passes")

    try:
        crop = photo_crop(req.path, req.clf)
        with attending(req.clf):
            return req.clf.faithfulness(crop, req.method, req.target, key=req.path, progress=report,
                                        **req.options)
    except (OSError, SyntaxError) as e:
        raise checks.refusal(DAMAGED) from e


def public(result: dict, model: str) -> dict:
    """What `/faithfulness` returns: the Classifier's answer and the model's display name."""
    keep = ("method", "target", "target_index", "probability", "deletion_auc", "insertion_auc", "saco", "curves", "random",
            "steps", "forward_passes", "completeness")
    return {"model": model, **{k: result[k] for k in keep if k in result}}


def completeness_html(result: dict) -> str:
    """For a complete map: the share of the class's score (its logit) that the drawn patches account for."""
    c = result.get("completeness")
    if c is None:
        return ""
    return (f"<p><b>The patches account for {c['share']:.0%} of the score</b> (logit {c['logit']:.3f}): patches "
            f"{c['patches']:.3f}, class token {c['prefix']:.3f}, the head's bias {c['bias']:.3f}; they add up to "
            "the logit.</p>")


def verdict(result: dict) -> str:
    """How the map compares with a random order, on the figures as shown (three decimals)."""
    rnd = result["random"]
    wins = ((round(result["deletion_auc"], 3) < round(rnd["deletion_auc"], 3))
            + (round(result["insertion_auc"], 3) > round(rnd["insertion_auc"], 3)))
    return ("This map does no better than a random order here.",
            "This map beats a random order on one of the two.",
            "This map beats a random order on both.")[wins]


def scores_html(result: dict) -> str:
    """The two AUCs with one sentence each, the random order's beside them, what they cost, and the plot's key."""
    rnd, target = result["random"], checks.text(result["target"])
    legend = "".join(f'<span><i style="background:{colour}"></i>{name}</span>' for name, colour in CURVES.items())
    return (
        f"<p><b>Deletion AUC {result['deletion_auc']:.3f}</b> (random order {rnd['deletion_auc']:.3f}). Lower is "
        f"better: hiding the patches this map ranks first should make <i>{target}</i> fall at once.</p>"
        f"<p><b>Insertion AUC {result['insertion_auc']:.3f}</b> (random order {rnd['insertion_auc']:.3f}). Higher "
        "is better: revealing those patches first, over a blurred copy, should bring it back at once.</p>"
        f"<p><b>SaCo {saco_text(result.get('saco'))}</b> (from -1 to 1). Higher is better: groups of patches the map "
        "ranks higher should lower the probability more when hidden (Wu et al. 2024).</p>"
        f"{completeness_html(result)}"
        f"<p>{verdict(result)} <small>{result['steps']} steps per curve, {result['forward_passes']} forward passes; "
        f"{target} has {percent(result['probability'])} on the whole crop.</small></p>"
        f'<div class="legend">{legend}</div>'
    )


def saco_text(value: float | None) -> str:
    return "undefined (the map ranks nothing)" if value is None else f"{value:.3f}"


def curves(result: dict) -> pd.DataFrame:
    """Both curves of the map and of the random order, long form: one row per point."""
    rows = []
    for suffix, res in (("", result), (", random order", result["random"])):
        c = res["curves"]
        for kind in ("deletion", "insertion"):
            rows += [{X: 100 * x, Y: p, "curve": kind + suffix} for x, p in zip(c["x"], c[kind])]
    return pd.DataFrame(rows)


def hidden_plot() -> gr.LinePlot:
    return gr.LinePlot(value=None, visible=False)


def cleared() -> tuple:
    """The map's score emptied, for every event that draws a new map: (scores, plot)."""
    return "", hidden_plot()


def score_panel() -> tuple:
    """Lays out the map's score, to go under the map: (button, scores, plot)."""
    gr.HTML(ABOUT, elem_id="faith-about", css_template=SMALL_CSS)
    button = gr.Button("Score this map", variant="secondary", elem_id="faith-btn")
    scores = gr.HTML(elem_id="faith-scores", css_template=SCORES_CSS)
    plot = gr.LinePlot(
        x=X, y=Y, color="curve", color_map=CURVES, colors_in_legend=[],  # the key is in `scores`: it wraps on phones
        x_title=X, y_title="probability of the class", x_lim=[0, 100], y_lim=[0, None], tooltip="all",
        label="Deletion and insertion curves", show_label=False, elem_id="faith-plot", height=240, visible=False,
    )
    return button, scores, plot


def wire_score(shared: Shared, panel: tuple, method, target, controls: dict) -> None:
    """Wires the score panel and the public `/faithfulness` endpoint.

    Args:
        shared: the page's photo, model choice and hooks.
        panel: what `score_panel` laid out.
        method, target: the Attention tab's method and class choices.
        controls: the tab's controls by option name (layer, head, head_fusion, discard_ratio).
    """
    default = shared.display(shared.registry.default)
    c = controls

    @gpu
    def faithfulness(
        image: str,
        method: str = "rollout",
        target: str | None = None,
        model: str = default,
        layer: int | None = None,
        head: str = "mean",
        head_fusion: str = "mean",
        discard_ratio: float = DEFAULT_DISCARD_RATIO,
        progress=gr.Progress(),
    ):
        """How far one map can be trusted: deletion and insertion AUCs and SaCo for the target class (empty: the
        top class), with a random baseline (the mean of seeded random patch orders) beside them. Only the options
        `method` reads are checked.

        Args:
            image: the photo, as a data URL ("data:image/jpeg;base64,..."; JPEG, PNG, WebP, BMP, GIF or TIFF; at most 20 MB, 40 megapixels).
            method: the map to score: rollout, attention, relevance, balanced_relevance, libra_fullgrad, input_x_gradient or gradient_rollout (not heads).
            target: the class whose probability is followed, a label as classify names it; empty for the top class.
            model: which model answers, one of the names listed for this argument (default: the app's default model).
            layer: attention: which layer, a whole number from 1 to the model's depth (default: the last layer of the model named).
            head: attention: "mean" for the mean of all heads, or one head's number from 1 ("3").
            head_fusion: rollout: how each layer's heads are combined, mean, max or min.
            discard_ratio: rollout, gradient_rollout: share of each layer's weakest attention dropped, from 0 to 0.99.
        Returns:
            {"model", "method", "target" (label), "target_index", "probability", "deletion_auc" (lower is
             better), "insertion_auc" (higher is better), "saco" (-1 to 1, higher is better; null for a map
             that ranks nothing), "curves": {"x", "deletion", "insertion"}, "random": {"deletion_auc",
             "insertion_auc", "curves", "orders", "deletion_auc_sd", "insertion_auc_sd"}, "steps",
             "forward_passes", and for libra_fullgrad "completeness": {"logit", "patches", "prefix", "bias",
             "share" (the share of the logit the map's patches account for)}}.
        """
        req = parse(shared, image, method, model, layer, head, head_fusion, discard_ratio, target)
        result = score(req, progress)
        return public(result, shared.display_name(model)), (scores_html(result), gr.LinePlot(value=curves(result), visible=True))

    button, scores, plot = panel
    data = gr.JSON(label="Faithfulness", visible=False, elem_id="faith-data")  # what /faithfulness returns
    view = gr.State()  # the page's view of the same answer (gradio_client does not see State)
    inputs = [shared.photo, method, target, shared.model, c["layer"], c["head"], c["head_fusion"], c["discard_ratio"]]
    button.click(faithfulness, inputs, [data, view], api_name="faithfulness", show_progress_on=scores,
                 **fair.lane("heavy")).success(
        relay(2), view, [scores, plot], api_name="show_faithfulness", api_visibility="private"
    )
    shared.clears(scores)
    for changed, name in ((shared.photo.change, "faith_clear_photo"), (shared.model.input, "faith_clear_model")):
        changed(hidden_plot, None, plot, queue=False, api_name=name, api_visibility="private", show_progress="hidden")


def build_compare(shared: Shared, target, controls: dict, alpha) -> None:
    """An accordion that draws and scores every method of COMPARED for this photo, side by side."""

    @gpu
    def compare(image, target, model, layer, head, head_fusion, discard_ratio, alpha, progress=gr.Progress()):
        alpha = checks.fraction(alpha, 0, 1, "overlay opacity")
        reqs = [parse(shared, image, m, model, layer, head, head_fusion, discard_ratio, target) for m in COMPARED]
        tiles, results = [], []
        for i, req in enumerate(reqs):
            name = COMPARED[req.method]
            if req.method == "attention":
                name += f", layer {req.options['layer'] % req.clf.config.depth + 1}"

            def report(done, total, i=i, name=name):
                progress(min((i + done / max(total, 1)) / len(reqs), 1.0), desc=f"Scoring {name}")

            progress(i / len(reqs), desc=f"Scoring {name}")
            try:
                crop = photo_crop(req.path, req.clf)
                with attending(req.clf):
                    crop, grid_map, _, _ = req.clf.maps(crop, req.method, req.target, key=req.path, **req.options)
                    result = req.clf.faithfulness(crop, req.method, req.target, key=req.path, progress=report,
                                                  **req.options)
            except (OSError, SyntaxError) as e:
                raise checks.refusal(DAMAGED) from e
            tiles.append((figures.draw(figures.enlarge(crop), grid_map, alpha)[0], name, result))
            results.append((name, result))
        return tiles_html(tiles), compare_table(results)

    with gr.Accordion("Compare methods", open=False, elem_id="compare"):
        gr.HTML(COMPARE_ABOUT, css_template=SMALL_CSS)
        button = gr.Button("Draw and score every method", variant="secondary", elem_id="compare-btn", size="sm")
        tiles = gr.HTML(elem_id="compare-maps", css_template=TILES_CSS)
        table = gr.Markdown(elem_id="compare-table")

    c = controls
    inputs = [shared.photo, target, shared.model, c["layer"], c["head"], c["head_fusion"], c["discard_ratio"], alpha]
    button.click(compare, inputs, [tiles, table], api_name="compare", api_visibility="private",
                 show_progress_on=tiles, **fair.lane("heavy"))
    shared.clears(tiles, table)


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def tiles_html(tiles: list[tuple[Image.Image, str, dict]]) -> str:
    """One tile per method: its map (inline, so no file is written for it), its name and its two AUCs."""
    figures_ = "".join(
        f'<figure><img src="{_data_url(image)}" alt="{html.escape(name)}"><figcaption><b>{html.escape(name)}</b><br>'
        f"deletion {r['deletion_auc']:.3f} · insertion {r['insertion_auc']:.3f} · SaCo {saco_text(r['saco'])}"
        + (f"<br>{r['completeness']['share']:.0%} of the logit" if "completeness" in r else "")
        + "</figcaption></figure>"
        for image, name, r in tiles
    )
    return f'<div class="tiles">{figures_}</div>'


def compare_table(results: list[tuple[str, dict]]) -> str:
    """The AUCs of every method and of a random order, as a Markdown table; the best of each column in bold."""
    first = results[0][1]
    rows = [(name, r["deletion_auc"], r["insertion_auc"], r["saco"]) for name, r in results]
    rows.append(("*random order*", first["random"]["deletion_auc"], first["random"]["insertion_auc"], None))
    best_deletion = min(round(d, 3) for _, d, _, _ in rows)
    best_insertion = max(round(i, 3) for _, _, i, _ in rows)
    sacos = [round(c, 3) for _, _, _, c in rows if c is not None]
    best_saco = max(sacos) if sacos else None

    def cell(value: float | None, best: float | None) -> str:
        if value is None:
            return "–"
        return f"**{value:.3f}**" if round(value, 3) == best else f"{value:.3f}"

    lines = ["| method | deletion AUC ↓ | insertion AUC ↑ | SaCo ↑ |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {cell(d, best_deletion)} | {cell(i, best_insertion)} | {cell(c, best_saco)} |" for name, d, i, c in rows]
    passes = sum(r["forward_passes"] for _, r in results)
    return (
        f"Scored for the class **{checks.text(first['target'])}** ({percent(first['probability'])} on the whole crop), "
        f"{first['steps']} steps per curve, {passes} forward passes. Deletion: lower is better; insertion: higher "
        "is better.\n\n" + "\n".join(lines)
    )
