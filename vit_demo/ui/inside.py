"""The "Inside" tab: one photo followed through the chosen model's forward pass, top to bottom, in the order the
model computes.

1. Patches: the crop cut into its numbered patches.
2. Patch embedding: the filters' principal components, and the tokens as colours (their first three principal
   components as RGB) after the embedding and after a chosen block.
3. Class token and positions: what is prepended, and the position embeddings' similarity.
4. The encoder blocks: a picked patch's attention and feature similarity at a chosen layer (click the crop); each
   head's mean attention distance and prefix share; the answer read out after every block.
5. The head: logits, softmax, top-k.

Each step shows its picture, how to read it, the tensor's shape for this photo and model, and the lines of
`vit_demo/model.py` that compute it, read from the source when the page is built (`inside.step_code`). The
quantities are computed in `vit_demo/inside.py` from one forward pass per photo and model (`Classifier.walk`,
kept as the Attention tab's attention is); this module only wires them to the page. The model-only parts
(filters, position embeddings) are kept per loaded model. The tab is redrawn when the photo or the model changes,
and when it is opened; the controls redraw only their own part.

Public endpoints: `/attention_distance` (image, model) -> the (layers x heads) tables as JSON;
`/patch` (image, row, col, layer, head, model) -> one patch's attention and similarity grids as JSON;
`/layers` (image, model) -> the top classes read out after every block as JSON.
"""

from __future__ import annotations

import html
import weakref

import gradio as gr
import pandas as pd
import torch

from .. import inside as ins
from ..classifier import Classifier
from ..hub import ModelLoadError
from . import checks, fair
from .classify import percent
from .common import DAMAGED, Shared, gpu, need
from .guard import ResultImage, photo_crop
from .maps import attending

TAB = "Inside"  # the tab's label, as the page's open-tab state holds it
COMPONENTS = 28  # principal components of the patch-embedding filters drawn (fewer when the filters have fewer)
TOP_K = 5  # classes listed per layer by /layers and in the head's table
NO_PHOTO = "*Give a photo (or pick an example) to see its patches.*"
NO_PHOTO_DISTANCE = "*Give a photo to see how far each head looks in it.*"
NO_PHOTO_TOKENS = "*Give a photo to see its tokens as colours.*"
NO_PHOTO_PICK = "*Give a photo, then click a patch of it.*"
NO_PHOTO_ANSWER = "<p><em>Give a photo to see the answer form, block by block.</em></p>"

INTRO = (
    "Follow this photo through this model, in the order the model computes: patches, their embedding, the class "
    "token and positions, the encoder blocks, and the head. Each step shows its picture, the shape of the tensor "
    "it makes for this photo and model, and the lines of `vit_demo/model.py` that compute it. The first pictures "
    "after figure 7 of the ViT paper (Dosovitskiy et al. 2021)."
)
PATCHES_NOTE = (
    "The model sees the crop below (the photo resized and cropped as the checkpoint was trained), cut into "
    "N = H·W/P² square patches. Each patch is numbered with its place in the token sequence."
)
FILTERS_NOTE = (
    "Each patch is flattened and multiplied by the same learned matrix, `patch_embed.proj`: one filter per "
    "output dimension. These tiles are the main patterns those filters share (their principal components), "
    "strongest first; each tile is scaled on its own, so only its pattern counts, not its brightness."
)
TOKENS_NOTE = (
    "**The tokens as colours.** Red, green and blue are the first three principal components of this photo's patch "
    "tokens at that depth, each scaled from its lowest value over the patches to its highest: patches that the "
    "model treats alike share a colour. The colours mean nothing beyond that, and are not comparable between the "
    "two pictures."
)
POSITION_NOTE = (
    "Each patch's token gets a learned position embedding added. Small map (i, j) shows how similar patch (i, j)'s "
    "embedding is to every other patch's (cosine similarity, one colour scale for all maps: dark is the lowest, "
    "bright the highest, as the bar under them says). A bright spot around its own place, and bright rows and "
    "columns, mean the model has learned the 2-D layout from a 1-D sequence."
)
BLOCKS_NOTE = (
    "Each block lets every token look at every other (attention: a softmax over the tokens, per head), then "
    "transforms each token on its own (an MLP); both results are added to the tokens. The sequence keeps its shape "
    "through every block."
)
PICK_NOTE = (
    "**Pick a patch**: click it on the crop (outlined in cyan), or set its row and column. Left: where that patch "
    "attends at the chosen layer (one head or the mean of the heads): its row of the attention matrix. Right: how "
    "alike its features are to every other patch's after that block (cosine similarity). Dark is the lowest value on "
    "the grid, bright the highest; the bar under each map gives both."
)
DISTANCE_NOTE = (
    "One dot per head: how far, in pixels of the crop, the head looks among the patches on average, weighting each "
    "patch's distance by the attention it gets (renormalised over the patches). Low dots attend to nearby patches, "
    "like a small convolution; high dots gather from across the whole image. The attention a head gives the class "
    "token (and the distillation token), which has no place on the grid, is left out of the distance and plotted "
    "below it as the **prefix share**: a head with a high share mostly reads the class token, whatever its distance."
)
LAYERS_NOTE = (
    "The model answers only after its last block. Here its final LayerNorm and head "
    "are applied to the tokens the head reads after every block, as if the model stopped there. The line is the "
    "probability of the final answer after each block: where it rises is where the decision is made."
)
HEAD_NOTE = (
    "The final LayerNorm and the head turn the tokens it reads into one logit per class; softmax makes them "
    "probabilities that sum to 1, and the top ones are the answer: the Classify tab's, restated."
)


def _walk(clf: Classifier, path: str) -> dict:
    """The kept forward pass of a photo the guard admitted (Classifier.walk)."""
    try:
        crop = photo_crop(path, clf)
        with attending(clf):
            return clf.walk(crop, key=path)
    except (OSError, SyntaxError) as e:
        raise checks.refusal(DAMAGED) from e


def _crop(clf: Classifier, path: str) -> torch.Tensor:
    try:
        return clf.crop(photo_crop(path, clf), key=path)
    except (OSError, SyntaxError) as e:
        raise checks.refusal(DAMAGED) from e


def _model_figures(clf: Classifier) -> tuple:
    """(filters image, filters caption, position image, position caption, prefix sentence) of a model, from its
    weights alone."""
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
    return (ins.draw_filters(components), filters_caption, ins.draw_position_similarity(sim), position_caption,
            prefix_text(cfg))


def prefix_text(cfg) -> str:
    """What is prepended to the patch tokens, in words."""
    if cfg.distilled:
        what = ("two learned tokens are put before the patch tokens: the **class token** and the **distillation "
                "token** (DeiT: one head reads each, and their answers are averaged)")
    else:
        what = "one learned token is put before the patch tokens: the **class token**"
    read = ("; this model's head reads the mean of the patch tokens instead" if cfg.global_pool == "avg"
            else ", whose final state the head reads")
    return (f"Before the first block, {what}{read}. Then a learned position "
            "embedding is added to every token, so that the model knows where each patch was.")


CODE_STYLE = "white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.85em; margin: 4px 0 12px"  # wraps on a phone


def code_html(step: str, shape: str | None, what: str = "") -> str:
    """A step's shape for this photo and model, and the lines of vit_demo/model.py that compute it (HTML, escaped)."""
    if shape:
        head = f"<b>Shape for this photo and model:</b> <code>{html.escape(shape)}</code>{html.escape(what)}."
    else:
        head = "<b>Shape:</b> give a photo to see it."
    parts = [f"<p>{head}</p>"]
    for e in ins.step_code(step):
        parts.append(f"<p><code>{e['function']}</code> in <code>vit_demo/model.py</code>, lines {e['start']}–{e['end']}:</p>"
                     f'<pre style="{CODE_STYLE}"><code>{html.escape(e["code"])}</code></pre>')
    return "".join(parts)


def distance_table(clf: Classifier, crop: torch.Tensor, attns: list[torch.Tensor]) -> dict:
    """The mean attention distance and prefix share of every head in every layer, as `/attention_distance`
    returns them."""
    p, num_prefix = clf.config.patch_size, clf.config.num_prefix_tokens
    grid = clf.grid(crop)
    table = ins.mean_attention_distance(attns, num_prefix, grid, p)  # (layers, heads)
    share = ins.prefix_share(attns, num_prefix, grid)  # (layers, heads)
    return {
        "layers": table.shape[0],
        "heads": table.shape[1],
        "patch_size": p,
        "grid": list(grid),
        "crop": list(crop.shape[-2:]),
        "distance_px": table.tolist(),
        "prefix_share": share.tolist(),
    }


def layers_table(clf: Classifier, walk: dict, k: int = TOP_K) -> dict:
    """The top-k classes read out after every block, as `/layers` returns them."""
    probs = walk["layer_logits"].softmax(-1)  # (depth, num_classes)
    final = int(walk["logits"].argmax())
    return {
        "readout": ins.readout_name(clf.config),
        "layers": [{"layer": i + 1, "top_k": [{"label": label, "probability": p} for label, p in clf.top_k(logits, k)]}
                   for i, logits in enumerate(walk["layer_logits"])],
        "final": {"label": clf.labels[final], "probability_by_layer": probs[:, final].tolist()},
    }


def patch_json(clf: Classifier, walk: dict, row: int, col: int, layer: int, head: int | None) -> dict:
    """One patch's view (row, col, layer from 1; head from 1 or None for the mean), as `/patch` returns it."""
    cfg = clf.config
    grid = clf.grid(walk["crop"])
    view = ins.patch_view(walk["attns"], walk["tokens"], cfg.num_prefix_tokens, grid, row - 1, col - 1, layer - 1,
                          None if head is None else head - 1)
    names = ins.prefix_names(cfg.num_prefix_tokens)
    return {
        "grid": list(grid), "row": row, "col": col, "token": view["token"], "layer": layer,
        "head": "mean" if head is None else head,
        "attention": view["attention"].tolist(),
        "attention_to_prefix": dict(zip(names, view["attention_prefix"].tolist())),
        "similarity": view["similarity"].tolist(),
        "similarity_to_prefix": dict(zip(names, view["similarity_prefix"].tolist())),
    }


def patch_pictures(clf: Classifier, walk: dict, view: dict) -> tuple:
    """(picker, attention map, similarity map, caption) of a `patch_json` view."""
    crop, p = walk["crop"], clf.config.patch_size
    r, c = view["row"] - 1, view["col"] - 1
    attention = torch.tensor(view["attention"])
    similarity = torch.tensor(view["similarity"])
    head = "the mean of the heads" if view["head"] == "mean" else f"head {view['head']}"
    prefix = ", ".join(f"{name} token {100 * a:.1f}%" for name, a in view["attention_to_prefix"].items())
    caption = (
        f"Patch row {view['row']}, column {view['col']} (token {view['token']}), layer {view['layer']}, {head}. "
        f"Its attention to the patches sums to {100 * float(attention.sum()):.1f}%; the rest goes to the {prefix}. "
        f"Its output token is most like the patches shown bright (cosine similarity from {float(similarity.min()):.2f} "
        f"to {float(similarity.max()):.2f})."
    )
    return (ins.draw_pick(crop, p, r, c), ins.draw_patch_map(crop, attention, p, r, c, "attention weight"),
            ins.draw_patch_map(crop, similarity, p, r, c, "cosine similarity"), caption)


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


def distance_plots(table: dict, counts: dict) -> tuple[gr.ScatterPlot, gr.ScatterPlot, str]:
    """The scatter plots of a distance table (one dot per head, one column per layer): the distance and the prefix
    share; and their caption."""
    layers = [str(layer + 1) for layer in range(table["layers"])]  # categories, kept in their order by `sort`
    rows = [
        {"layer": layers[layer], "distance (px)": d, "prefix share (%)": 100 * s, "head": f"head {h + 1}"}
        for layer, (heads, shares) in enumerate(zip(table["distance_px"], table["prefix_share"]))
        for h, (d, s) in enumerate(zip(heads, shares))
    ]
    frame = pd.DataFrame(rows)
    pairs = ins.patch_distances(counts["grid"], counts["patch_size"])  # (n, n)
    farthest, uniform = float(pairs.max()), float(pairs.mean())
    distance = gr.ScatterPlot(value=frame, sort=layers, y_lim=[0, max(farthest, 1.0)])
    share = gr.ScatterPlot(value=frame, sort=layers, y_lim=[0, 100])
    means = torch.tensor(table["prefix_share"]).mean(1)  # (layers,)
    caption = (
        f"{table['layers']} layers × {table['heads']} heads. Attention spread evenly over all patches would give "
        f"{uniform:.1f} px; the farthest patch centres are {farthest:.1f} px apart (the top of the axis). "
        f"The heads give the prefix token{'s' if counts['prefix_tokens'] > 1 else ''} "
        f"{100 * float(means.min()):.0f}% to {100 * float(means.max()):.0f}% of their attention on average per layer."
    )
    return distance, share, caption


def answer_plot(table: dict) -> gr.LinePlot:
    """The final class's probability after every block."""
    probs = table["final"]["probability_by_layer"]
    blocks = [str(i) for i in range(1, len(probs) + 1)]  # categories, kept in their order by `sort`
    frame = pd.DataFrame({"block": blocks, "probability (%)": [100 * p for p in probs],
                          "top class there": [layer["top_k"][0]["label"] for layer in table["layers"]]})
    return gr.LinePlot(value=frame, sort=blocks, y_lim=[0, 100])


def answer_html(table: dict) -> str:
    """The top class after every block, and the final class's probability there, as an HTML table (escaped)."""
    final = checks.text(table["final"]["label"])
    rows = "".join(
        f"<tr><td>{layer['layer']}</td><td>{checks.text(layer['top_k'][0]['label'])} "
        f"({percent(layer['top_k'][0]['probability'])})</td><td>{percent(p)}</td></tr>"
        for layer, p in zip(table["layers"], table["final"]["probability_by_layer"])
    )
    return (
        f"<p>Read out from {html.escape(table['readout'])}. The final answer is <b>{final}</b>.</p>"
        f'<table class="inside-table"><tr><th>after block</th><th>top class there</th><th>{final}</th></tr>{rows}</table>'
    )


def head_html(clf: Classifier, walk: dict, k: int = TOP_K) -> str:
    """Logits, then softmax, then the top k classes: a table (escaped)."""
    logits = walk["logits"]
    probs = logits.softmax(-1)
    top = probs.topk(min(k, len(clf.labels))).indices.tolist()
    rows = "".join(
        f"<tr><td>{checks.text(clf.labels[i])}</td><td>{float(logits[i]):.2f}</td><td>{percent(probs[i])}</td></tr>"
        for i in top
    )
    return (
        f'<table class="inside-table"><tr><th>class</th><th>logit</th><th>softmax</th></tr>{rows}</table>'
        f"<p>The top {len(top)} of {len(clf.labels):,} classes.</p>"
    )


def _on_page(value, n: int, default: int) -> int:
    """A row, column or layer as the page's control holds it, within 1..n (else `default`)."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        return default
    return v if 1 <= v <= n else default


def build(shared: Shared, tab: gr.Tab | None = None) -> None:
    """Builds the tab's components inside the current layout and wires its events.

    Args:
        shared: the page's photo, model choice and hooks.
        tab: the tab this is built in; opening it draws the parts.
    """
    registry = shared.registry
    default = shared.display(registry.default)
    try:
        cfg = registry.get(registry.default).config
        depth, heads, side = cfg.depth, cfg.num_heads, cfg.grid_size
    except ModelLoadError:  # nothing could be loaded: the page says why
        depth, heads, side = 12, 12, 14
    kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its figures, while it stays loaded

    # --- the public endpoints -----------------------------------------------------------------------------------

    @gpu
    def attention_distance(image: str, model: str = default) -> dict:
        """How far each head of each layer looks for this photo: its mean attention distance in pixels of the crop
        (the attention-weighted distance between patch centres, over the patch keys, as in the ViT paper's
        figure 7), and the share of its attention that goes to the class (and distillation) token instead.

        Args:
            image: the photo, as a data URL ("data:image/jpeg;base64,..."; JPEG, PNG, WebP, BMP, GIF or TIFF; at most 20 MB, 40 megapixels).
            model: which model answers, one of the names listed for this argument (default: the app's default model).
        Returns:
            {"model", "layers", "heads", "patch_size", "grid": [gh, gw], "crop": [H, W],
             "distance_px": layers x heads list of lists, "prefix_share": layers x heads list of lists}.
        """
        path = need(image)
        clf = shared.classifier(model)
        walk = _walk(clf, path)
        return {"model": shared.display_name(model), **distance_table(clf, walk["crop"], walk["attns"])}

    def patch_request(image, row, col, layer, head, model) -> tuple[Classifier, dict, tuple]:
        """Checked inputs of /patch: (classifier, walk, (row, col, layer, head)), counted from 1."""
        path = need(image)
        clf = shared.classifier(model)
        c = clf.config
        gh, gw = clf.grid(_crop(clf, path))
        r = gh // 2 + 1 if row in (None, "") else checks.whole(row, 1, gh, "row")
        col = gw // 2 + 1 if col in (None, "") else checks.whole(col, 1, gw, "column")
        layer = c.depth if layer in (None, "") else checks.whole(layer, 1, c.depth, "layer")
        head = None if head in (None, "", "mean") else checks.whole(head, 1, c.num_heads, "head")
        return clf, _walk(clf, path), (r, col, layer, head)

    @gpu
    def patch(image: str, row: int | None = None, col: int | None = None, layer: int | None = None,
              head: str = "mean", model: str = default):
        """Where one patch attends at one layer, and how alike its features are to every other token's there.

        Args:
            image: the photo, as a data URL ("data:image/jpeg;base64,..."; JPEG, PNG, WebP, BMP, GIF or TIFF; at most 20 MB, 40 megapixels).
            row: the patch's row, a whole number from 1 to the grid's height (default: the centre patch).
            col: the patch's column, a whole number from 1 to the grid's width (default: the centre patch).
            layer: the block, a whole number from 1 to the model's depth (default: the last).
            head: "mean" for the mean of the heads (the default), or one head's number from 1 ("3").
            model: which model answers, one of the names listed for this argument (default: the app's default model).
        Returns:
            {"model", "grid": [gh, gw], "row", "col", "token", "layer", "head", "attention": gh x gw,
             "attention_to_prefix": {"class": ...}, "similarity": gh x gw, "similarity_to_prefix": {...}}.
        """
        clf, walk, (r, c, layer, head) = patch_request(image, row, col, layer, head, model)
        return {"model": shared.display_name(model), **patch_json(clf, walk, r, c, layer, head)}

    @gpu
    def patch_page(image, row, col, layer, head, model):
        """/patch for the page's controls: the numbers, and the pictures."""
        if image is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        clf, walk, (r, c, layer, head) = patch_request(image, row, col, layer, head, model)
        view = {"model": shared.display_name(model), **patch_json(clf, walk, r, c, layer, head)}
        return view, *patch_pictures(clf, walk, view)

    @gpu
    def layers(image: str, model: str = default) -> dict:
        """The answer read out after every block: the final LayerNorm and head applied to the tokens the head reads,
        so that one sees at which depth the final answer forms.

        Args:
            image: the photo, as a data URL ("data:image/jpeg;base64,..."; JPEG, PNG, WebP, BMP, GIF or TIFF; at most 20 MB, 40 megapixels).
            model: which model answers, one of the names listed for this argument (default: the app's default model).
        Returns:
            {"model", "readout", "layers": [{"layer": 1, "top_k": [{"label", "probability"}, ...]}, ...],
             "final": {"label", "probability_by_layer": [...]}}.
        """
        path = need(image)
        clf = shared.classifier(model)
        return {"model": shared.display_name(model), **layers_table(clf, _walk(clf, path))}

    # --- the page -------------------------------------------------------------------------------------------------

    def model_figures(model):
        clf = shared.classifier(model)
        if clf not in kept:
            kept[clf] = _model_figures(clf)
        return kept[clf]

    def model_parts(model):
        """A newly chosen model's figures, and the controls reset to its size."""
        c = shared.classifier(model).config
        return (*model_figures(model), gr.Slider(maximum=c.depth, value=c.depth), gr.Slider(maximum=c.depth, value=c.depth),
                gr.Dropdown(choices=["mean"] + [str(h + 1) for h in range(c.num_heads)], value="mean"),
                gr.Slider(maximum=c.grid_size, value=c.grid_size // 2 + 1),
                gr.Slider(maximum=c.grid_size, value=c.grid_size // 2 + 1))

    def empty_walk():
        return (None, NO_PHOTO, code_html("patches", None), code_html("embedding", None), None, None,
                NO_PHOTO_TOKENS, code_html("prefix", None), code_html("blocks", None),
                gr.skip(), gr.skip(), None, None, None, NO_PHOTO_PICK, code_html("attention", None), None,
                None, None, NO_PHOTO_DISTANCE, None, NO_PHOTO_ANSWER, None, "", code_html("head", None))

    @gpu
    def walk_parts(image, model, row, col, layer, head, block):
        if image is None:
            return empty_walk()
        clf = shared.classifier(model)
        walk = _walk(clf, image)
        c = clf.config
        crop, attns, tokens = walk["crop"], walk["attns"], walk["tokens"]
        p, prefix = c.patch_size, c.num_prefix_tokens
        (gh, gw), (C, H, W) = clf.grid(crop), crop.shape
        n, N, D = gh * gw, tokens[0].shape[0], tokens[0].shape[1]
        picture, counts = ins.patch_grid(crop, p, prefix)

        block = _on_page(block, c.depth, c.depth)
        embedded, ratio0 = ins.token_colours(tokens[0], prefix, (gh, gw))
        after, ratio1 = ins.token_colours(tokens[block], prefix, (gh, gw))
        tokens_caption = (
            f"Left: after the embedding; right: after block {block} of {c.depth}. The three components explain "
            f"{100 * float(ratio0.sum()):.0f}% and {100 * float(ratio1.sum()):.0f}% of the patch tokens' variance."
        )

        r, col_ = _on_page(row, gh, gh // 2 + 1), _on_page(col, gw, gw // 2 + 1)
        layer = _on_page(layer, c.depth, c.depth)
        h = None if head in (None, "", "mean") else _on_page(head, c.num_heads, None)
        view = {"model": shared.display_name(model), **patch_json(clf, walk, r, col_, layer, h)}
        picker, attention_map, similarity_map, pick_caption = patch_pictures(clf, walk, view)

        distance, share, distance_caption = distance_plots(distance_table(clf, crop, attns), counts)
        table = {"model": view["model"], **layers_table(clf, walk)}
        heads_ = attns[0].shape[0]
        return (
            picture, counts_text(counts),
            code_html("patches", f"(1, {C}, {H}, {W})", f": the normalised crop, to be cut into {n} patches of {p}×{p}"),
            code_html("embedding", f"(1, {n}, {D})", f": one {D}-number token per patch"),
            ins.draw_token_colours(embedded), ins.draw_token_colours(after), tokens_caption,
            code_html("prefix", f"(1, {N}, {D})", f": {prefix} prefix token{'s' if prefix > 1 else ''} + {n} patch tokens"),
            code_html("blocks", f"(1, {N}, {D})", f" after each of the {c.depth} blocks"),
            gr.Slider(maximum=gh, value=r), gr.Slider(maximum=gw, value=col_),
            picker, attention_map, similarity_map, pick_caption,
            code_html("attention", f"(1, {heads_}, {N}, {N})", f": every block's attention, {heads_} heads"),
            view, distance, share, distance_caption, answer_plot(table), answer_html(table), table,
            head_html(clf, walk), code_html("head", f"(1, {walk['logits'].shape[0]})", ": one logit per class"),
        )

    def walk_if_open(open_tab, image, *args):
        if open_tab != TAB and image is not None:
            return (gr.skip(),) * len(walk_outputs)  # drawn when the tab is opened
        return walk_parts(image, *args)

    @gpu
    def tokens_after(image, model, block):
        if image is None:
            return None, NO_PHOTO_TOKENS
        clf = shared.classifier(model)
        walk = _walk(clf, image)
        c, grid = clf.config, clf.grid(walk["crop"])
        block = checks.whole(block, 1, c.depth, "block")
        colours, ratio = ins.token_colours(walk["tokens"][block], c.num_prefix_tokens, grid)
        _, ratio0 = ins.token_colours(walk["tokens"][0], c.num_prefix_tokens, grid)
        return ins.draw_token_colours(colours), (
            f"Left: after the embedding; right: after block {block} of {c.depth}. The three components explain "
            f"{100 * float(ratio0.sum()):.0f}% and {100 * float(ratio.sum()):.0f}% of the patch tokens' variance.")

    def pick(image, model, evt: gr.SelectData):
        """A click on the crop -> the row and column of the patch under it (from 1)."""
        if image is None:
            return gr.skip(), gr.skip()
        clf = shared.classifier(model)
        crop = _crop(clf, image)
        gh, gw = clf.grid(crop)
        cell = clf.config.patch_size * ins.cell_scale(clf.config.patch_size)
        try:
            x, y = (int(v) for v in evt.index)
        except (TypeError, ValueError):
            return gr.skip(), gr.skip()
        return min(max(y // cell, 0), gh - 1) + 1, min(max(x // cell, 0), gw - 1) + 1

    gr.Markdown(INTRO)

    gr.Markdown("### 1. Patches\n" + PATCHES_NOTE)
    patches = ResultImage(label="The crop the model saw, cut into patches", show_label=False, type="pil",
                          format="png", elem_id="inside-patches", interactive=False, height=320)
    counts = gr.Markdown(NO_PHOTO, elem_id="inside-counts")
    code_patches = gr.HTML(code_html("patches", None), elem_id="inside-code-patches")

    gr.Markdown("### 2. Patch embedding\n" + FILTERS_NOTE)
    filters = ResultImage(label="Principal components of the patch-embedding filters", show_label=False, type="pil",
                          format="png", elem_id="inside-filters", interactive=False, height=240)
    filters_caption = gr.Markdown(elem_id="inside-filters-caption")
    gr.Markdown(TOKENS_NOTE)
    with gr.Row(elem_id="inside-tokens-row"):
        tokens_embed = ResultImage(label="After the embedding", type="pil",
                                   format="png", elem_id="inside-tokens-embed", interactive=False, height=240,
                                   min_width=160)
        tokens_block = ResultImage(label="After the chosen block", type="pil",
                                   format="png", elem_id="inside-tokens-block", interactive=False, height=240,
                                   min_width=160)
    block = checks.Slider(1, depth, value=depth, step=1, label="After block", elem_id="inside-token-block",
                          info="Which block's output tokens to colour on the right.")
    tokens_caption = gr.Markdown(NO_PHOTO_TOKENS, elem_id="inside-tokens-caption")
    code_embedding = gr.HTML(code_html("embedding", None), elem_id="inside-code-embedding")

    gr.Markdown("### 3. Class token and positions")
    prefix = gr.Markdown(elem_id="inside-prefix")
    gr.Markdown(POSITION_NOTE)
    positions = ResultImage(label="Similarity of each position embedding with all others", show_label=False,
                            type="pil", format="png", elem_id="inside-positions", interactive=False, height=440)
    positions_caption = gr.Markdown(elem_id="inside-positions-caption")
    code_prefix = gr.HTML(code_html("prefix", None), elem_id="inside-code-prefix")

    gr.Markdown("### 4. The encoder blocks\n" + BLOCKS_NOTE)
    code_blocks = gr.HTML(code_html("blocks", None), elem_id="inside-code-blocks")
    gr.Markdown(PICK_NOTE)
    with gr.Row(elem_id="inside-pick-row"):
        picker = ResultImage(label="Click a patch", type="pil", format="png", elem_id="inside-pick",
                             interactive=False, height=300, min_width=200)
        patch_attention = ResultImage(label="Where it attends", type="pil", format="png",
                                      elem_id="inside-patch-attention", interactive=False, height=300, min_width=200)
        patch_similarity = ResultImage(label="How alike its features are", type="pil", format="png",
                                       elem_id="inside-patch-similarity", interactive=False, height=300, min_width=200)
    pick_caption = gr.Markdown(NO_PHOTO_PICK, elem_id="inside-pick-caption")
    with gr.Row():
        row = checks.Slider(1, side, value=side // 2 + 1, step=1, label="Row", elem_id="inside-row", min_width=120)
        col = checks.Slider(1, side, value=side // 2 + 1, step=1, label="Column", elem_id="inside-col", min_width=120)
    with gr.Row():
        layer = checks.Slider(1, depth, value=depth, step=1, label="Layer", elem_id="inside-layer", min_width=120)
        head = checks.Dropdown(["mean"] + [str(h + 1) for h in range(heads)], value="mean", label="Head",
                               elem_id="inside-head", min_width=120)
    code_attention = gr.HTML(code_html("attention", None), elem_id="inside-code-attention")
    with gr.Accordion("The numbers (as the /patch endpoint returns them)", open=False):
        patch_numbers = gr.JSON(label="This patch's attention and similarity", elem_id="inside-patch-json")
    # /patch's own inputs: none is set on the page, so that a call that leaves them out gets the centre patch and
    # the last layer of the model it names (the page's controls hold the default model's values).
    api_inputs = [checks.Dropdown([], value=None, allow_custom_value=True, label=name, visible=False)
                  for name in ("Row", "Column", "Layer")]
    api_inputs.append(checks.Dropdown(["mean"], value="mean", allow_custom_value=True, label="Head", visible=False))
    api_button = gr.Button("Patch", visible=False)

    gr.Markdown("#### Mean attention distance\n" + DISTANCE_NOTE)
    distances = gr.ScatterPlot(
        x="layer", y="distance (px)", color="head", x_title="layer", y_title="mean attention distance (px)",
        color_title="head", tooltip="all", label="Mean attention distance per head", show_label=False,
        elem_id="inside-distance", height=300,
    )
    shares = gr.ScatterPlot(
        x="layer", y="prefix share (%)", color="head", x_title="layer", y_title="attention to the prefix (%)",
        color_title="head", tooltip="all", label="Share of attention on the prefix tokens per head", show_label=False,
        elem_id="inside-prefix-share", height=220,
    )
    distance_caption = gr.Markdown(NO_PHOTO_DISTANCE, elem_id="inside-distance-caption")
    with gr.Accordion("The numbers (as the /attention_distance endpoint returns them)", open=False,
                      elem_id="inside-table-accordion") as table_accordion:
        table = gr.JSON(label="Attention distance table", elem_id="inside-table")

    gr.Markdown("#### The answer, layer by layer\n" + LAYERS_NOTE)
    answers_plot = gr.LinePlot(x="block", y="probability (%)", x_title="after block", tooltip="all",
                               y_title="final answer (%)", label="The final answer's probability",
                               show_label=False, elem_id="inside-layers-plot", height=260)
    answers = gr.HTML(NO_PHOTO_ANSWER, elem_id="inside-layers")
    with gr.Accordion("The numbers (as the /layers endpoint returns them)", open=False,
                      elem_id="inside-layers-accordion") as layers_accordion:
        layers_numbers = gr.JSON(label="The top classes after every block", elem_id="inside-layers-json")

    gr.Markdown("### 5. The head\n" + HEAD_NOTE)
    head_table = gr.HTML(elem_id="inside-head")
    code_head = gr.HTML(code_html("head", None), elem_id="inside-code-head")

    quiet = dict(api_visibility="private", show_progress="hidden")
    walk_outputs = [patches, counts, code_patches, code_embedding, tokens_embed, tokens_block, tokens_caption,
                    code_prefix, code_blocks, row, col, picker, patch_attention, patch_similarity, pick_caption,
                    code_attention, patch_numbers, distances, shares, distance_caption, answers_plot, answers,
                    layers_numbers, head_table, code_head]
    walk_inputs = [shared.photo, shared.model, row, col, layer, head, block]
    model_outputs = [filters, filters_caption, positions, positions_caption, prefix, block, layer, head, row, col]
    pick_pictures = [picker, patch_attention, patch_similarity, pick_caption]
    # Results of one photo go as soon as the photo or the model changes (the page empties images and text; the
    # plots and the tables are emptied here), and come back from the photo handler once the photo passed the guard.
    shared.clears(patches, counts, tokens_embed, tokens_block, tokens_caption, picker, patch_attention,
                  patch_similarity, pick_caption, distance_caption, head_table)
    cleared = [distances, shares, table, patch_numbers, answers_plot, layers_numbers, answers]
    for changed, name in ((shared.photo.change, "inside_clear_photo"), (shared.model.input, "inside_clear_model")):
        changed(lambda: (None,) * 6 + (NO_PHOTO_ANSWER,), None, cleared, queue=False, api_name=name, **quiet)
    shared.on_model(model_parts, [shared.model], model_outputs, api_name="inside_model", **fair.lane("heavy"))
    shared.on_photo(walk_if_open, [shared.open_tab, *walk_inputs], walk_outputs, api_name="inside_photo",
                    **fair.lane("heavy"))
    if tab is not None:
        tab.select(model_figures, [shared.model], model_outputs[:5], api_name="inside_open_model", **quiet,
                   **fair.lane("heavy"))
        tab.select(walk_parts, walk_inputs, walk_outputs, api_name="inside_open_photo", trigger_mode="always_last",
                   **quiet, **fair.lane("heavy"))
    table_accordion.expand(attention_distance, [shared.photo, shared.model], table, api_name="attention_distance",
                           **fair.lane("heavy"))

    api_button.click(patch, [shared.photo, *api_inputs, shared.model], patch_numbers, api_name="patch", **fair.lane("heavy"))
    patch_inputs = [shared.photo, row, col, layer, head, shared.model]
    show = dict(api_visibility="private", show_progress_on=pick_pictures[1:3], trigger_mode="always_last")
    gr.on([row.input, col.input, layer.input, head.input], patch_page, patch_inputs, [patch_numbers, *pick_pictures],
          api_name="inside_patch", **show, **fair.lane("heavy"))
    picker.select(pick, [shared.photo, shared.model], [row, col], api_name="inside_pick", trigger_mode="always_last",
                  **quiet).success(
        patch_page, patch_inputs, [patch_numbers, *pick_pictures], api_name="inside_pick_patch", **show,
        **fair.lane("heavy"))
    block.input(tokens_after, [shared.photo, shared.model, block], [tokens_block, tokens_caption],
                api_name="inside_tokens", trigger_mode="always_last", api_visibility="private",
                show_progress_on=tokens_block, **fair.lane("heavy"))
    layers_accordion.expand(layers, [shared.photo, shared.model], layers_numbers, api_name="layers", **fair.lane("heavy"))
