"""The "Attention" tab: where the transformer looked, drawn over the crop it saw."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ..explain import DEFAULT_DISCARD_RATIO, HEAD_FUSIONS, METHODS, render
from . import checks
from .common import Shared, gpu, need
from .guard import ResultImage, decoding

METHOD_CHOICES = [("Attention rollout", "rollout"), ("Class-token attention (one layer)", "attention"), ("All heads of one layer", "heads")]
MIN_VIEW = 224  # maps of smaller crops are drawn larger, by a whole factor
DAMAGED = "This file could not be read as an image (it may be truncated or damaged): try another file."


def build(shared: Shared, depth: int, heads: int) -> dict[str, gr.components.Component]:
    """Builds the tab inside the current layout and wires its events; returns the controls a model change resets."""
    registry = shared.registry

    @gpu
    def explain(
        image: str,
        method: str = "rollout",
        model: str = registry.default,
        layer: int = depth,
        head: str = "mean",
        head_fusion: str = "mean",
        discard_ratio: float = DEFAULT_DISCARD_RATIO,
        alpha: float = 0.6,
    ):
        """Where the model looked, over the crop it saw. Returns the overlay (and the crop, for the page)."""
        path = need(image)
        method = checks.choice(method, METHODS, "method")
        clf = shared.classifier(model)
        c = clf.config
        layer = checks.whole(layer, 1, c.depth, "layer") - 1
        head_idx = None if head in (None, "", "mean") else checks.whole(head, 1, c.num_heads, "head") - 1
        head_fusion = checks.choice(head_fusion, HEAD_FUSIONS, "head fusion")
        discard_ratio = checks.fraction(discard_ratio, 0, 0.99, "discard ratio")
        alpha = checks.fraction(alpha, 0, 1, "overlay opacity")
        try:
            with decoding(path):
                crop, attns, _ = clf.attention(path, key=path)
        except (OSError, SyntaxError) as e:
            raise checks.refusal(DAMAGED) from e
        scale = -(-MIN_VIEW // max(crop.shape[1:]))  # small crops (28x28) are enlarged, pixels kept sharp
        if scale > 1:
            crop = crop.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (C, H * s, W * s)
        overlay = render(crop, attns, c.num_prefix_tokens, method, layer=layer, head=head_idx,
                         head_fusion=head_fusion, discard_ratio=discard_ratio, alpha=alpha)
        return overlay, Image.fromarray(crop.permute(1, 2, 0).squeeze(-1).numpy())

    method = checks.Radio(METHOD_CHOICES, value="rollout", label="Method", elem_id="method")
    with gr.Row():
        layer = checks.Slider(1, depth, value=depth, step=1, label="Layer (attention, heads)", elem_id="layer")
        head = checks.Dropdown(["mean"] + [str(h + 1) for h in range(heads)], value="mean", label="Head (attention)", elem_id="head")
    with gr.Row():
        head_fusion = checks.Radio(list(HEAD_FUSIONS), value="mean", label="Head fusion (rollout)", elem_id="head-fusion")
        discard_ratio = checks.Slider(0, 0.99, value=DEFAULT_DISCARD_RATIO, step=0.01, label="Discard ratio (rollout)", elem_id="discard")
    alpha = checks.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity", elem_id="alpha")
    button = gr.Button("Explain", variant="primary", elem_id="explain-btn")
    with gr.Row():
        overlay = ResultImage(label="Where it looked", type="pil", format="png", elem_id="overlay", interactive=False)
        crop = ResultImage(label="The crop the model saw", type="pil", format="png", elem_id="crop", interactive=False)
    crop_state = gr.State()  # /explain returns just the overlay; the crop follows in a private event

    inputs = [shared.photo, method, shared.model, layer, head, head_fusion, discard_ratio, alpha]
    button.click(explain, inputs, [overlay, crop_state], api_name="explain").then(
        lambda c: c, crop_state, crop, api_name="show_crop", api_visibility="private"
    )

    def explain_live(image, *args):  # redraw as the controls move, once there is a photo
        return (gr.skip(), gr.skip()) if image is None else explain(image, *args)

    for control in (method, layer, head, head_fusion, discard_ratio, alpha):
        control.change(explain_live, inputs, [overlay, crop], api_name=f"explain_on_{control.elem_id.replace('-', '_')}",
                       api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    return {"layer": layer, "head": head}
