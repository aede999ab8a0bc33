"""The "Attention" tab: where the transformer looked, drawn over the crop it saw.

The map is drawn when the tab is opened, and again when the photo, the model or a control changes; the button
re-runs the public `/explain` endpoint, which returns the overlay alone. Beside the map: the class and
probability it belongs to, a colour bar, and one sentence on the method. Only the chosen method's controls show.

To offer another method of `vit_demo.explain`, add it to METHOD_CHOICES; the options it reads (explain.OPTIONS)
name the controls it shows, and explain.DESCRIPTIONS gives its sentence. A new option needs a control in
`build` under the same name.
"""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ..explain import CLASS_SPECIFIC, DEFAULT_DISCARD_RATIO, DESCRIPTIONS, HEAD_FUSIONS, METHODS, OPTIONS
from . import checks, figures
from .classify import percent
from .common import DAMAGED, Shared, gpu, need, probabilities
from .guard import ResultImage, decoding

# The methods the page offers, in order: (label on the page, method of vit_demo.explain).
METHOD_CHOICES = [
    ("Attention rollout", "rollout"),
    ("Class-token attention (one layer)", "attention"),
    ("All heads of one layer", "heads"),
]
ALWAYS_SHOWN = ("alpha",)  # controls every method uses
MIN_VIEW = 224  # maps of smaller crops are drawn larger, by a whole factor


def shown_controls(method: str) -> tuple[str, ...]:
    """The names of the controls `method` reads, in the order the page lays them out."""
    return tuple(OPTIONS[method]) + ALWAYS_SHOWN


def method_note(method: str) -> str:
    return DESCRIPTIONS[method]


def caption(method: str, label: str, probability: float) -> str:
    """Which class the map belongs to, with its probability."""
    if method in CLASS_SPECIFIC:
        return f"This map explains the class **{label}** ({percent(probability)})."
    return f"The model's answer: **{label}** ({percent(probability)}). This map is the same for every class."


def build(shared: Shared, depth: int, heads: int, tab: gr.Tab | None = None) -> dict[str, gr.components.Component]:
    """Builds the tab inside the current layout and wires its events.

    Args:
        shared: the page's photo, model choice and hooks.
        depth, heads: the default model's layers and heads, for the controls' first ranges.
        tab: the tab this is built in; opening it draws the map.
    Returns:
        the controls, by the option name they set.
    """
    registry = shared.registry

    def draw(image, method, model, layer, head, head_fusion, discard_ratio, alpha):
        """Checked inputs -> (overlay, crop, caption, colour bar)."""
        path = need(image)
        method = checks.choice(method, METHODS, "method")
        clf = shared.classifier(model)
        c = clf.config
        options = dict(
            layer=checks.whole(layer, 1, c.depth, "layer") - 1,
            head=None if head in (None, "", "mean") else checks.whole(head, 1, c.num_heads, "head") - 1,
            head_fusion=checks.choice(head_fusion, HEAD_FUSIONS, "head fusion"),
            discard_ratio=checks.fraction(discard_ratio, 0, 0.99, "discard ratio"),
        )
        alpha = checks.fraction(alpha, 0, 1, "overlay opacity")
        try:
            with decoding(path, clf):
                crop, grid_map, target, logits = clf.maps(path, method, None, key=path, **options)
        except (OSError, SyntaxError) as e:
            raise checks.refusal(DAMAGED) from e
        scale = -(-MIN_VIEW // max(crop.shape[1:]))  # small crops (28x28) are enlarged, pixels kept sharp
        if scale > 1:
            crop = crop.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (C, H * s, W * s)
        overlay, low, high = figures.draw(crop, grid_map, alpha)
        p = float(probabilities(logits)[target])
        what = "all heads of this layer" if method == "heads" else "this map"
        return (overlay, Image.fromarray(crop.permute(1, 2, 0).squeeze(-1).numpy()),
                caption(method, clf.labels[target], p), figures.colour_bar(low, high, what))

    @gpu
    def explain(
        image: str,
        method: str = "rollout",
        model: str = shared.display(registry.default),
        layer: int = depth,
        head: str = "mean",
        head_fusion: str = "mean",
        discard_ratio: float = DEFAULT_DISCARD_RATIO,
        alpha: float = 0.6,
    ):
        """Where the model looked, over the crop it saw. Returns the overlay (and, for the page, the rest)."""
        overlay, *rest = draw(image, method, model, layer, head, head_fusion, discard_ratio, alpha)
        return overlay, rest

    @gpu
    def draw_page(image, *args):
        if image is None:
            return None, None, "", ""
        return draw(image, *args)

    def draw_if_open(open_tab, image, *args):
        if open_tab != "Attention" and image is not None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()  # drawn when the tab is opened
        return draw_page(image, *args)

    def show_controls(method):
        method = checks.choice(method, METHODS, "method")
        wanted = shown_controls(method)
        return [gr.update(visible=name in wanted) for name in controls] + [method_note(method)]

    def reset_controls(model):
        c = shared.classifier(model).config
        return (gr.Slider(maximum=c.depth, value=c.depth),
                gr.Dropdown(choices=["mean"] + [str(h + 1) for h in range(c.num_heads)], value="mean"))

    with gr.Row(elem_id="map-row"):
        overlay = ResultImage(label="Where it looked", show_label=False, type="pil", format="png", elem_id="overlay",
                              interactive=False, buttons=["download", "fullscreen"])
    map_caption = gr.Markdown(elem_id="map-class")
    colour_bar = gr.HTML(figures.colour_bar(), elem_id="colour-bar")
    method = checks.Radio(METHOD_CHOICES, value="rollout", label="Method", elem_id="method")
    about = gr.Markdown(method_note("rollout"), elem_id="method-note")
    first = shown_controls("rollout")
    controls = {
        "layer": checks.Slider(1, depth, value=depth, step=1, label="Layer", elem_id="layer", visible="layer" in first,
                               info="Which transformer block's attention to draw (1 is the first)."),
        "head": checks.Dropdown(["mean"] + [str(h + 1) for h in range(heads)], value="mean", label="Head",
                                elem_id="head", visible="head" in first, info="One head, or the mean of all heads."),
        "head_fusion": checks.Radio(list(HEAD_FUSIONS), value="mean", label="Head fusion", elem_id="head-fusion",
                                    visible="head_fusion" in first, info="How each layer's heads are combined before rolling out."),
        "discard_ratio": checks.Slider(0, 0.99, value=DEFAULT_DISCARD_RATIO, step=0.01, label="Discard ratio",
                                       elem_id="discard", visible="discard_ratio" in first,
                                       info="The share of each layer's weakest attention left out: higher keeps only the strongest paths."),
        "alpha": checks.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity", elem_id="alpha",
                               info="0 shows the crop alone, 1 the map alone."),
    }
    button = gr.Button("Explain again", variant="secondary", elem_id="explain-btn")
    crop = ResultImage(label="The crop the model saw", type="pil", format="png", elem_id="crop", interactive=False,
                       height=224)
    extras = gr.State()  # /explain returns just the overlay; the rest follows in a private event

    outputs = [overlay, crop, map_caption, colour_bar]
    c = controls
    inputs = [shared.photo, method, shared.model, c["layer"], c["head"], c["head_fusion"], c["discard_ratio"], c["alpha"]]
    live = dict(api_visibility="private", show_progress_on=overlay, trigger_mode="always_last")

    shared.clears(*outputs)
    shared.on_photo(draw_if_open, [shared.open_tab, *inputs], outputs, api_name="explain_photo", show_progress_on=overlay)
    shared.on_model(reset_controls, [shared.model], [c["layer"], c["head"]], api_name="explain_controls")
    button.click(explain, inputs, [overlay, extras], api_name="explain").success(
        lambda rest: rest, extras, outputs[1:], api_name="show_extras", api_visibility="private"
    )
    method.input(show_controls, method, [*controls.values(), about], api_name="explain_method", api_visibility="private",
                 queue=False, show_progress="hidden")
    triggers = [control.input for control in (method, *controls.values())]
    if tab is not None:
        triggers.append(tab.select)
    gr.on(triggers, draw_page, inputs, outputs, api_name="explain_live", **live)
    return controls
