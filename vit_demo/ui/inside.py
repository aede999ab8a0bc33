"""The "Inside" tab: how this transformer sees, read from the loaded checkpoint and the current photo.

Four parts, after the ViT paper's figure 7: the photo's patches, the patch-embedding filters, the position
embeddings' similarity and each head's mean attention distance. The quantities are computed in
`vit_demo/inside.py`; this module only wires them to the page. The model-only parts (filters, position
embeddings) need no photo and are kept per loaded model; the photo parts stay empty until there is a photo.
The tab is redrawn when the photo or the model changes, and when the tab is opened.

Public endpoint: `/attention_distance` (image, model) -> the (layers x heads) table as JSON.
"""

from __future__ import annotations

import weakref

import gradio as gr
import pandas as pd
import torch

from .. import inside as ins
from ..classifier import Classifier
from . import checks
from .common import DAMAGED, Shared, gpu, need
from .guard import ResultImage, decoding
from .maps import attending

TAB = "Inside"  # the tab's label, as the page's open-tab state holds it
COMPONENTS = 28  # principal components of the patch-embedding filters drawn (fewer when the filters have fewer)
NO_PHOTO = "*Give a photo (or pick an example) to see its patches.*"
NO_PHOTO_DISTANCE = "*Give a photo to see how far each head looks in it.*"

INTRO = (
    "A ViT reads a photo as a sequence of tokens: one per patch, after a class token. These pictures are computed "
    "from the checkpoint you picked (and the photo you gave), after figure 7 of the ViT paper "
    "(Dosovitskiy et al. 2021)."
)
FILTERS_NOTE = (
    "Each patch is flattened and multiplied by the same learned matrix, `patch_embed.proj`: one filter per "
    "output dimension. These tiles are the main patterns those filters share (their principal components), "
    "strongest first; each tile is scaled on its own, so only its pattern counts, not its brightness."
)
POSITION_NOTE = (
    "Each patch's token gets a learned position embedding added. Small map (i, j) shows how similar patch (i, j)'s "
    "embedding is to every other patch's (cosine similarity, one colour scale for all maps). A bright spot around its "
    "own place, and bright rows and columns, mean the model has learned the 2-D layout from a 1-D sequence."
)
DISTANCE_NOTE = (
    "One dot per head: how far, in pixels of the crop, the head looks on average, weighting each patch's distance "
    "by the attention it gets. It is the head's \"receptive field\": low dots attend to nearby patches, like a small "
    "convolution; high dots gather from across the whole image."
)


def _model_figures(clf: Classifier) -> tuple:
    """(filters image, filters caption, position image, position caption) of a model, from its weights alone."""
    cfg = clf.config
    weight = clf.model.patch_embed.proj.weight  # (D, C, p, p)
    D, C, p, _ = weight.shape
    components, ratio = ins.filter_components(weight, k=COMPONENTS)
    k = components.shape[0]
    colour = "RGB" if C == 3 else "grey"
    filters_caption = (
        f"The first {k} principal components of the {D} filters ({C}×{p}×{p} numbers each, drawn in {colour}); "
        f"together they explain **{100 * float(ratio.sum()):.1f}%** of the filters' variance "
        f"(the first alone {100 * float(ratio[0]):.1f}%)."
    )
    grid = (cfg.grid_size, cfg.grid_size)
    sim = ins.position_similarity(clf.model.pos_embed, cfg.num_prefix_tokens, grid)  # (gh, gw, gh, gw)
    position_caption = (
        f"{grid[0]}×{grid[1]} maps, one per patch position, each over the same {grid[0]}×{grid[1]} grid; "
        f"the prefix token{'s are' if cfg.num_prefix_tokens > 1 else ' is'} left out."
    )
    return ins.draw_filters(components), filters_caption, ins.draw_position_similarity(sim), position_caption


def _attend(clf: Classifier, path: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The crop the model saw and every layer's attention, for a photo the guard admitted."""
    try:
        with decoding(path, clf), attending(clf):
            crop, attns, _ = clf.attention(path, key=path)
    except (OSError, SyntaxError) as e:
        raise checks.refusal(DAMAGED) from e
    return crop, attns


def distance_table(clf: Classifier, crop: torch.Tensor, attns: list[torch.Tensor]) -> dict:
    """The mean attention distance of every head in every layer, as the JSON `/attention_distance` returns."""
    p, num_prefix = clf.config.patch_size, clf.config.num_prefix_tokens
    grid = clf.grid(crop)
    table = ins.mean_attention_distance(attns, num_prefix, grid, p)  # (layers, heads)
    return {
        "layers": table.shape[0],
        "heads": table.shape[1],
        "patch_size": p,
        "grid": list(grid),
        "crop": list(crop.shape[-2:]),
        "distance_px": table.tolist(),
    }


def build(shared: Shared, tab: gr.Tab | None = None) -> None:
    """Builds the tab's components inside the current layout and wires its events.

    Args:
        shared: the page's photo, model choice and hooks.
        tab: the tab this is built in; opening it draws the parts.
    """
    registry = shared.registry
    kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its figures, while it stays loaded

    @gpu
    def attention_distance(image: str, model: str = shared.display(registry.default)) -> dict:
        """Mean attention distance (pixels of the crop) of every head in every layer, for one photo.

        Returns:
            {"model", "layers", "heads", "patch_size", "grid": [gh, gw], "crop": [H, W],
             "distance_px": layers x heads list of lists}.
        """
        path = need(image)
        clf = shared.classifier(model)
        crop, attns = _attend(clf, path)
        return {"model": shared.display_name(model), **distance_table(clf, crop, attns)}

    def model_parts(model):
        clf = shared.classifier(model)
        if clf not in kept:
            kept[clf] = _model_figures(clf)
        return kept[clf]

    @gpu
    def photo_parts(image, model):
        if image is None:
            return None, NO_PHOTO, None, NO_PHOTO_DISTANCE
        clf = shared.classifier(model)
        crop, attns = _attend(clf, image)
        cfg = clf.config
        picture, counts = ins.patch_grid(crop, cfg.patch_size, cfg.num_prefix_tokens)
        return (picture, counts_text(counts), *distance_plot(distance_table(clf, crop, attns), counts))

    def photo_parts_if_open(open_tab, image, model):
        if open_tab != TAB and image is not None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()  # drawn when the tab is opened
        return photo_parts(image, model)

    gr.Markdown(INTRO)
    gr.Markdown("### Patches")
    patches = ResultImage(label="The crop the model saw, cut into patches", show_label=False, type="pil",
                          format="png", elem_id="inside-patches", interactive=False, height=320)
    counts = gr.Markdown(NO_PHOTO, elem_id="inside-counts")

    gr.Markdown("### Patch-embedding filters\n" + FILTERS_NOTE)
    filters = ResultImage(label="Principal components of the patch-embedding filters", show_label=False, type="pil",
                          format="png", elem_id="inside-filters", interactive=False, height=240)
    filters_caption = gr.Markdown(elem_id="inside-filters-caption")

    gr.Markdown("### Position-embedding similarity\n" + POSITION_NOTE)
    positions = ResultImage(label="Similarity of each position embedding with all others", show_label=False,
                            type="pil", format="png", elem_id="inside-positions", interactive=False, height=440)
    positions_caption = gr.Markdown(elem_id="inside-positions-caption")

    gr.Markdown("### Mean attention distance\n" + DISTANCE_NOTE)
    distances = gr.ScatterPlot(
        x="layer", y="distance (px)", color="head", x_title="layer", y_title="mean attention distance (px)",
        color_title="head", tooltip="all", label="Mean attention distance per head", show_label=False,
        elem_id="inside-distance", height=320,
    )
    distance_caption = gr.Markdown(NO_PHOTO_DISTANCE, elem_id="inside-distance-caption")
    with gr.Accordion("The numbers (as the /attention_distance endpoint returns them)", open=False):
        table_button = gr.Button("Show the table", elem_id="inside-table-btn")
        table = gr.JSON(label="Attention distance table", elem_id="inside-table")

    quiet = dict(api_visibility="private", show_progress="hidden")
    photo_outputs = [patches, counts, distances, distance_caption]
    # Results of one photo go as soon as the photo or the model changes (the page empties images and text; the
    # plot and the table are emptied here), and come back from the photo handler once the photo passed the guard.
    shared.clears(patches, counts, distance_caption)
    for changed, name in ((shared.photo.change, "inside_clear_photo"), (shared.model.input, "inside_clear_model")):
        changed(lambda: (None, None), None, [distances, table], queue=False, api_name=name, **quiet)
    shared.on_model(model_parts, [shared.model], [filters, filters_caption, positions, positions_caption],
                    api_name="inside_model")
    shared.on_photo(photo_parts_if_open, [shared.open_tab, shared.photo, shared.model], photo_outputs,
                    api_name="inside_photo")
    if tab is not None:
        tab.select(model_parts, [shared.model], [filters, filters_caption, positions, positions_caption],
                   api_name="inside_open_model", **quiet)
        tab.select(photo_parts, [shared.photo, shared.model], photo_outputs, api_name="inside_open_photo",
                   trigger_mode="always_last", **quiet)
    table_button.click(attention_distance, [shared.photo, shared.model], table, api_name="attention_distance")


def counts_text(counts: dict) -> str:
    """The patch counts of `inside.patch_grid`, in a sentence."""
    (gh, gw), p, n = counts["grid"], counts["patch_size"], counts["prefix_tokens"]
    H, W = counts["crop"]
    return (
        f"**{counts['patches']} patches** ({gh}×{gw} of {p}×{p} pixels, from a {H}×{W} crop) "
        f"+ **{n} prefix token{'s' if n > 1 else ''}** ({' and '.join(counts['prefix'])}) "
        f"= a sequence of **{counts['sequence_length']} tokens**. Each patch is numbered with its place in the "
        "sequence; token 0 is the class token."
    )


def distance_plot(table: dict, counts: dict) -> tuple[gr.ScatterPlot, str]:
    """The scatter plot of a distance table (one dot per head, one column per layer) and its caption."""
    layers = [str(layer + 1) for layer in range(table["layers"])]  # categories, kept in their order by `sort`
    rows = [
        {"layer": layers[layer], "distance (px)": d, "head": f"head {h + 1}"}
        for layer, heads in enumerate(table["distance_px"]) for h, d in enumerate(heads)
    ]
    pairs = ins.patch_distances(counts["grid"], counts["patch_size"])  # (n, n)
    farthest, uniform = float(pairs.max()), float(pairs.mean())
    plot = gr.ScatterPlot(value=pd.DataFrame(rows), sort=layers, y_lim=[0, max(farthest, 1.0)])
    caption = (
        f"{table['layers']} layers × {table['heads']} heads. Attention spread evenly over all patches would give "
        f"{uniform:.1f} px; the farthest patch centres are {farthest:.1f} px apart (the top of the axis)."
    )
    return plot, caption
