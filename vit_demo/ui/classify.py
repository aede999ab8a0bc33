"""The "Classify" tab: the top-k classes of the photo, which model answered, and how long it took."""

from __future__ import annotations

import time

import gradio as gr
import torch

from ..runtime import MAX_BATCH
from . import checks
from .common import Shared, gpu, need
from .guard import decoding

MAX_TOP_K = 20
DAMAGED = "This file could not be read as an image (it may be truncated or damaged): try another file."


def build(shared: Shared) -> None:
    """Builds the tab's components inside the current layout and wires its events."""
    registry = shared.registry

    @gpu
    def classify(image: str, top_k: int = 5, model: str = registry.default):
        """Top-k classes of an image. Returns the probabilities for a gr.Label."""
        path = need(image)
        k = checks.whole(top_k, 1, MAX_TOP_K, "top k")
        clf = shared.classifier(model)
        start = time.perf_counter()
        try:  # the upload's path is named by a hash of its content, so it keys the work kept for /explain
            with decoding(path):
                top = clf.predict(path, k=k, key=path)
        except (OSError, SyntaxError) as e:
            raise checks.refusal(DAMAGED) from e
        ms = 1000 * (time.perf_counter() - start)
        precision = "" if clf.dtype == torch.float32 else f" in {str(clf.dtype).removeprefix('torch.')}"
        info = f"**{shared.display_name(model)}** answered in {ms:.0f} ms on {clf.device.type.upper()}{precision}."
        return {label: score for label, score in top}, info

    top_k = checks.Slider(1, MAX_TOP_K, value=5, step=1, label="Top k", elem_id="top-k")
    button = gr.Button("Classify", variant="primary", elem_id="classify-btn")
    label = gr.Label(num_top_classes=MAX_TOP_K, label="Top classes", elem_id="label")
    answered = gr.Markdown(elem_id="answered")
    # The line under the label travels through State and a private follow-up event, so that /classify returns
    # just the Label (gradio_client does not see State).
    info = gr.State()
    # Up to MAX_BATCH visitors' images are decoded side by side, each in its own worker (a bad file fails only its
    # own request), and their forward passes are shared (runtime.Batcher). Gradio's own batch=True is not used:
    # one unreadable upload would fail its whole batch, and the per-request `validator` that could screen uploads
    # first does not accept batched events (Gradio 6.31).
    button.click(classify, [shared.photo, top_k, shared.model], [label, info], api_name="classify",
                 concurrency_limit=MAX_BATCH, concurrency_id="classify").then(
        lambda text: text, info, answered, api_name="show_info", api_visibility="private"
    )
