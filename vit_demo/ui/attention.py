"""The "Attention" tab: where the transformer looked, or why it chose a class, drawn over the crop it saw.

The map is drawn when the tab is opened, and again when the photo, the model, the class to explain or a
control changes; the button re-runs the public `/explain` endpoint, which returns the overlay alone. Beside the
map: the class and probability it belongs to, a colour bar, and one sentence on the method. Only the chosen
method's controls show. The class to explain is one of the photo's top classes (the top one until another is
picked); it steers the class-specific methods, and the others say that they are the same for every class.
Under the map, its faithfulness is scored on request (`faith.py`), and every method can be compared.

To offer another method, add its entry to `vit_demo.explain.METHOD_TABLE`: its label, sentence and options (which
name the controls it shows) come from there. A new option needs a control in
`build` under the same name, and a check in `maps.map_options`.
"""

from __future__ import annotations

import gradio as gr
import torch
from PIL import Image

from ..classifier import Classifier
from ..explain import CLASS_SPECIFIC, DEFAULT_DISCARD_RATIO, DESCRIPTIONS, HEAD_FUSIONS, METHOD_TABLE, METHODS, OPTIONS
from . import checks, fair, faith, figures
from .classify import percent
from .common import DAMAGED, Shared, gpu, probabilities, relay
from .guard import ResultImage, photo_crop
from .maps import attending, parse, target_value

# The methods the page offers, in the table's order: (label on the page, method of vit_demo.explain).
METHOD_CHOICES = [(m.label, name) for name, m in METHOD_TABLE.items()]
ALWAYS_SHOWN = ("alpha",)  # controls every method uses
TOP_CLASSES = 5  # the classes offered to explain
SCORE_LABEL = {True: "Score this map", False: "One map per head: pick Class-token attention and a head to score it"}
TARGET_INFO = {
    True: "The map answers: why this class? Pick another of the top classes to see what speaks for it.",
    False: "This method's map is the same for every class: pick a method that explains a class, such as Relevance or Libra FullGrad+.",
}


class TargetChoice(checks.Dropdown):
    """The class to explain: one of the photo's top classes on the page, any of the model's labels through the
    API (checked by maps.target_class), so the API describes it as text rather than the page's current choices."""

    def api_info(self) -> dict:
        return {"type": "string", "description": "a class label, as /classify names it; empty for the top class"}


def shown_controls(method: str) -> tuple[str, ...]:
    """The names of the controls `method` reads, in the order the page lays them out."""
    return tuple(OPTIONS[method]) + ALWAYS_SHOWN


def method_note(method: str) -> str:
    return DESCRIPTIONS[method]


def drawn(method: str, options: dict, depth: int) -> str:
    """What the map is drawn from: which layer and head, or which layers."""
    if method in ("attention", "heads"):
        layer = options["layer"] % depth + 1
        heads = ("one panel per head" if method == "heads" else
                 "the mean of the heads" if options["head"] is None else f"head {options['head'] + 1}")
        return f"Drawn from layer {layer} of {depth}, {heads}."
    if method == "rollout":
        return f"Drawn from all {depth} layers, heads fused by their {options['head_fusion']}."
    return f"Drawn from all {depth} layers."


def caption(method: str, label: str, probability: float, where: str = "") -> str:
    """Which class the map belongs to, with its probability, and what it is drawn from."""
    where = f" {where}" if where else ""
    if method in CLASS_SPECIFIC:
        return f"This map explains the class **{checks.text(label)}** ({percent(probability)}).{where}"
    return (f"The model's answer: **{checks.text(label)}** ({percent(probability)}). This map is the same for every "
            f"class.{where}")


def target_choices(clf: Classifier, logits: torch.Tensor, target: int) -> gr.Dropdown:
    """The class choice for a photo: its top classes with their probabilities, best first, `target` selected
    (and offered, should it not be among them)."""
    probs = probabilities(logits)
    top = probs.topk(min(TOP_CLASSES, len(clf.labels))).indices.tolist()
    if target not in top:
        top.append(target)
    choices = [(f"{clf.labels[i]} ({percent(probs[i])})", target_value(clf, i)) for i in top]
    return gr.Dropdown(choices=choices, value=target_value(clf, target))


def no_choices() -> gr.Dropdown:
    return gr.Dropdown(choices=[], value=None)


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

    def draw(image, method, model, layer, head, head_fusion, discard_ratio, alpha, target):
        """Checked inputs -> (overlay, crop, caption, colour bar, class choice, the emptied score)."""
        req = parse(shared, image, method, model, layer, head, head_fusion, discard_ratio, target)
        alpha = checks.fraction(alpha, 0, 1, "overlay opacity")
        clf = req.clf
        try:
            crop = photo_crop(req.path, clf)
            with attending(clf):
                crop, grid_map, t, logits = clf.maps(crop, req.method, req.target, key=req.path, **req.options)
        except (OSError, SyntaxError) as e:
            raise checks.refusal(DAMAGED) from e
        crop = figures.enlarge(crop)  # small crops (28x28) are enlarged, pixels kept sharp
        overlay, low, high = figures.draw(crop, grid_map, alpha)
        named = t if req.method in CLASS_SPECIFIC else int(logits.argmax())  # the others name the model's answer
        p = float(probabilities(logits)[named])
        what = "all heads of this layer" if req.method == "heads" else "this map"
        return (overlay, Image.fromarray(crop.permute(1, 2, 0).squeeze(-1).numpy()),
                caption(req.method, clf.labels[named], p, drawn(req.method, req.options, clf.config.depth)),
                figures.colour_bar(low, high, what),
                target_choices(clf, logits, t), *faith.cleared())

    @gpu
    def explain(
        image: str,
        method: str = "rollout",
        model: str = shared.display(registry.default),
        layer: int | None = None,
        head: str = "mean",
        head_fusion: str = "mean",
        discard_ratio: float = DEFAULT_DISCARD_RATIO,
        alpha: float = 0.6,
        target: str | None = None,
    ):
        """Draws where the model looked, as a heatmap over the square crop it saw (bright yellow: most, dark purple: least).

        Args:
            image: the photo, as a data URL ("data:image/jpeg;base64,..."; JPEG, PNG, WebP, BMP, GIF or TIFF; at most 20 MB, 40 megapixels).
            method: rollout (attention through all layers), attention (one layer), heads (a grid of one layer's heads); why `target`: relevance, balanced_relevance, libra_fullgrad, input_x_gradient or gradient_rollout.
            model: which model answers, one of the names listed for this argument (default: the app's default model).
            layer: attention, heads: which layer, a whole number from 1 to the model's depth (default: the last layer of the model named).
            head: attention: "mean" for the mean of all heads (the default), or one head's number from 1 ("3").
            head_fusion: rollout: how each layer's heads are combined, mean, max or min.
            discard_ratio: rollout, gradient_rollout: share of each layer's weakest attention dropped, from 0 to 0.99.
            alpha: opacity of the map over the crop, from 0 (the crop alone) to 1 (the map alone).
            target: the class-specific methods: the class to explain, a label as classify names it; empty for the top class.
        Returns:
            The heatmap over the crop, a PNG image.
        """
        overlay, *rest = draw(image, method, model, layer, head, head_fusion, discard_ratio, alpha, target)
        return overlay, rest

    @gpu
    def draw_page(image, *args):
        if image is None:
            return None, None, "", "", no_choices(), *faith.cleared()
        return draw(image, *args)

    def draw_if_open(open_tab, image, *args):
        """A new photo or model: drawn for its top class, if the tab is open."""
        if open_tab != "Attention" and image is not None:
            return (gr.skip(),) * len(outputs)  # drawn when the tab is opened
        return draw_page(image, *args, None)

    def show_controls(method):
        method = checks.choice(method, METHODS, "method")
        wanted = shown_controls(method)
        specific = method in CLASS_SPECIFIC
        return ([gr.update(visible=name in wanted) for name in controls] + [method_note(method)]
                + [gr.update(interactive=specific, info=TARGET_INFO[specific]), gr.update(interactive=method != "heads", value=SCORE_LABEL[method != "heads"])])

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
    target = TargetChoice([], value=None, label="Class to explain", elem_id="target", interactive=False,
                             info=TARGET_INFO[False])
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
    controls["layer"].api_default = None  # for API callers: the last layer of the model they name (page.Page)
    button = gr.Button("Explain again", variant="secondary", elem_id="explain-btn")
    panel = faith.score_panel()
    crop = ResultImage(label="The crop the model saw", type="pil", format="png", elem_id="crop", interactive=False,
                       height=224)
    faith.build_compare(shared, target, controls, controls["alpha"])
    faith.wire_score(shared, panel, method, target, controls)
    score_button, scores, plot = panel
    extras = gr.State()  # /explain returns just the overlay; the rest follows in a private event

    outputs = [overlay, crop, map_caption, colour_bar, target, scores, plot]
    c = controls
    inputs = [shared.photo, method, shared.model, c["layer"], c["head"], c["head_fusion"], c["discard_ratio"], c["alpha"],
              target]
    live = dict(api_visibility="private", show_progress_on=overlay, trigger_mode="always_last", **fair.lane("heavy"))

    shared.clears(overlay, crop, map_caption, colour_bar, target)
    shared.on_photo(draw_if_open, [shared.open_tab, *inputs[:-1]], outputs, api_name="explain_photo",
                    show_progress_on=overlay, **fair.lane("heavy"))
    shared.on_model(reset_controls, [shared.model], [c["layer"], c["head"]], api_name="explain_controls")
    button.click(explain, inputs, [overlay, extras], api_name="explain", **fair.lane("heavy")).success(
        relay(len(outputs) - 1), extras, outputs[1:], api_name="show_extras", api_visibility="private"
    )
    method.input(show_controls, method, [*controls.values(), about, target, score_button], api_name="explain_method",
                 api_visibility="private", queue=False, show_progress="hidden")
    triggers = [control.input for control in (method, target, *controls.values())]
    if tab is not None:
        triggers.append(tab.select)
    gr.on(triggers, draw_page, inputs, outputs, api_name="explain_live", **live)
    return controls
