"""The "Classify" tab: the top-k classes of the photo, which model answered, and how long it took.

A new photo is answered at once (`Shared.on_photo`); the button runs the public `/classify` endpoint, which
returns a Label's value ({"label", "confidences"}) as before. The page shows the same probabilities in a table of
its own (#label) that gives small ones enough digits to be non-zero: gr.Label rounds to whole percents, so a
1000-class model would show "0%" on every row.
"""

from __future__ import annotations

import math
import time

import gradio as gr
import torch

from ..classifier import Classifier
from ..registry import BUNDLED_NAME
from ..runtime import MAX_BATCH
from . import checks, fair
from .common import DAMAGED, Shared, gpu, need, relay
from .guard import photo_crop

MAX_TOP_K = 20


def percent(p: float) -> str:
    """A probability as a percentage with enough digits to be non-zero: "23.4%", "0.21%", "0.0034%"."""
    pct = 100 * float(p)
    if pct <= 0:
        return "0%"
    if pct < 1e-4:
        return "<0.0001%"
    decimals = max(1, 1 - math.floor(math.log10(pct)))  # two significant digits below 1%, one decimal above
    rounded = round(pct, decimals)
    if rounded >= 1:  # 0.996% rounds up to 1.00%: written as the percentages above 1% are, "1.0%"
        text = f"{pct:.1f}"
        return ">99.9%" if text == "100.0" and p < 1 else f"{text}%"
    decimals = max(1, 1 - math.floor(math.log10(rounded)))  # 0.0996% rounds up to 0.100%: two digits, "0.10%"
    return f"{pct:.{decimals}f}%"


def table(top: list[tuple[str, float]]) -> str:
    """The answer as HTML: the top class in large type, then every class with a bar and its percentage."""
    if not top:
        return ""
    name, p = top[0]
    rows = "".join(
        f'<tr><td class="name">{checks.text(label)}</td>'
        f'<td class="bar"><span style="width:{100 * score:.2f}%"></span></td>'
        f'<td class="pct">{percent(score)}</td></tr>'
        for label, score in top
    )
    return (
        f'<div class="answer"><span class="top-class" data-testid="top-class">{checks.text(name)}</span> '
        f'<span class="top-pct">{percent(p)}</span></div><table class="probs">{rows}</table>'
    )


def fallback_note(name: str, clf: Classifier | None) -> str:
    """What the bundled model can tell apart, for the box shown while it serves ("" for other models)."""
    if name != BUNDLED_NAME or clf is None:
        return ""
    return (
        f"ℹ️ **This model knows only {len(clf.labels)} kinds of clothing** ({', '.join(clf.labels)}): it gives every "
        "photo one of these names, whatever it shows. Try the clothing examples."
    )


def build(shared: Shared) -> None:
    """Builds the tab's components inside the current layout and wires its events."""
    registry = shared.registry
    default = shared.display(registry.default)

    def answer(image, top_k, model) -> tuple[list[tuple[str, float]], str]:
        path = need(image)
        k = checks.whole(top_k, 1, MAX_TOP_K, "top k")
        clf = shared.classifier(model)
        start = time.perf_counter()
        try:  # the upload's path is named by a hash of its content, so it keys the work kept for /explain
            with fair.cheap_cpu(clf.device):
                top = clf.predict(photo_crop(path, clf), k=k, key=path)
        except (OSError, SyntaxError) as e:
            raise checks.refusal(DAMAGED) from e
        ms = 1000 * (time.perf_counter() - start)
        precision = "" if clf.dtype == torch.float32 else f" in {str(clf.dtype).removeprefix('torch.')}"
        info = f"**{checks.text(shared.display_name(model))}** answered in {ms:.0f} ms on {clf.device.type.upper()}{precision}."
        return top, info

    @gpu
    def classify(image: str, top_k: int = 5, model: str = default):
        """Classifies a photo with a Vision Transformer: its top-k classes, best first, with their probabilities.

        Args:
            image: the photo, as a data URL ("data:image/jpeg;base64,..."; JPEG, PNG, WebP, BMP, GIF or TIFF; at most 20 MB, 40 megapixels).
            top_k: how many classes to return, a whole number from 1 to 20 (default 5).
            model: which model answers, one of the names listed for this argument (default: the app's default model).
        Returns:
            {"label": the top class, "confidences": [{"label", "confidence" (a probability, 0 to 1)}, ...] best first}.
        """
        top, info = answer(image, top_k, model)
        return {label: score for label, score in top}, (table(top), info)

    @gpu
    def answer_page(image, top_k, model):
        if image is None:
            return "", ""
        top, info = answer(image, top_k, model)
        return table(top), info

    def note_for(model):
        name = shared.resolve(model)
        text = fallback_note(name, shared.classifier(model) if name == BUNDLED_NAME else None)
        return gr.Markdown(text, visible=bool(text))

    shown = gr.HTML(elem_id="label", label="Top classes", min_height=40)
    loaded = registry.default in registry.loaded()
    text = fallback_note(registry.default, registry.get(registry.default) if loaded else None)
    note = gr.Markdown(text, visible=bool(text), elem_id="fallback-note")
    answered = gr.Markdown(elem_id="answered")
    with gr.Row(equal_height=True):
        top_k = checks.Slider(1, MAX_TOP_K, value=5, step=1, label="Top k", elem_id="top-k", scale=3)
        button = gr.Button("Classify again", variant="secondary", elem_id="classify-btn", scale=1)
    # What /classify returns to API clients; the page shows `shown` instead.
    label = gr.Label(num_top_classes=MAX_TOP_K, label="Top classes", elem_id="label-data", visible=False)
    page_view = gr.State()  # the button's answer as the page shows it (gradio_client does not see State)

    shared.clears(shown, answered)
    work = fair.lane("cheap")
    shared.on_photo(answer_page, [shared.photo, top_k, shared.model], [shown, answered], api_name="answer_photo",
                    show_progress="minimal", **work)
    shared.on_model(note_for, [shared.model], [note], api_name="fallback_note")
    top_k.input(answer_page, [shared.photo, top_k, shared.model], [shown, answered], api_name="answer_top_k",
                api_visibility="private", show_progress="minimal", trigger_mode="always_last", **work)
    # Up to MAX_BATCH visitors' images are decoded side by side, each in its own worker (a bad file fails only its
    # own request), and their forward passes are shared (runtime.Batcher). Gradio's own batch=True is not used:
    # one unreadable upload would fail its whole batch, and the per-request `validator` that could screen uploads
    # first does not accept batched events (Gradio 6.31).
    button.click(classify, [shared.photo, top_k, shared.model], [label, page_view], api_name="classify", **work).success(
        relay(2), page_view, [shown, answered], api_name="show_answer", api_visibility="private"
    )
