"""The Gradio page: a photo on the left, tabs "Classify" and "Attention" on the right.

Layout and event wiring only; the work is done by `Classifier`. Every event has an `api_name`; the two public
endpoints are `/classify` (image, top_k, model -> Label) and `/explain` (image, method, ... -> image), and
every input after the image has a default, so `client.predict(image=handle_file(p), api_name="/classify")`
works.
"""

from __future__ import annotations

import os
import time
import warnings

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError

from .explain import DEFAULT_DISCARD_RATIO, HEAD_FUSIONS, render
from .hub import ModelLoadError
from .registry import BUNDLED_NAME, Registry, bundled_available
from .runtime import MAX_BATCH

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
METHOD_CHOICES = [("Attention rollout", "rollout"), ("Class-token attention (one layer)", "attention"), ("All heads of one layer", "heads")]
MAX_FILE_SIZE = "20mb"
UNREADABLE = "This file could not be read as an image (it may be truncated or damaged): try another file."
MAX_MEGAPIXELS = 40
MIN_VIEW = 224  # maps of smaller crops are drawn larger, by a whole factor  # larger images are refused from their header, before decoding

try:  # On Hugging Face ZeroGPU hardware, inference runs under spaces.GPU; elsewhere this changes nothing.
    import spaces

    gpu = spaces.GPU if os.environ.get("SPACES_ZERO_GPU") else (lambda fn: fn)
except ImportError:
    gpu = lambda fn: fn  # noqa: E731

CSS = """
#status:empty {display: none}
#webcam-note {font-size: 0.85em; opacity: 0.8}
"""
# Browsers only allow the webcam on HTTPS pages or on localhost; say so when the page is neither.
JS = """
() => {
  if (!window.isSecureContext) {
    const note = document.querySelector('#webcam-note');
    if (note) note.innerHTML = '<b>The webcam is unavailable here:</b> browsers allow it only over HTTPS or on localhost. Use a share link (HTTPS), open the app on localhost, or upload a photo.';
  }
}
"""
LAUNCH_KWARGS = dict(css=CSS, js=JS, theme=gr.themes.Soft(), max_file_size=MAX_FILE_SIZE)


Image.MAX_IMAGE_PIXELS = MAX_MEGAPIXELS * 1_000_000


class PhotoInput(gr.Image):
    """gr.Image that turns an unreadable upload into a message for the visitor instead of a stack trace."""

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                path = super().preprocess(payload)
                if path is not None:  # gradio passes some uploads (SVG) through unopened: open every one here
                    with Image.open(path):
                        pass
                return path
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise gr.Error(f"This image has more than {MAX_MEGAPIXELS} megapixels: scale it down and try again.") from e
        except (UnidentifiedImageError, ValueError, OSError, SyntaxError) as e:
            raise gr.Error("This file could not be read as an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo.") from e


def start_registry(registry: Registry) -> tuple[Registry, str]:
    """Loads the default model; when that fails, serves the bundled model and says why on the page."""
    try:
        registry.get(registry.default)
        return registry, ""
    except ModelLoadError as e:
        reason = str(e)
    if bundled_available():
        failed = registry.default
        registry.default = BUNDLED_NAME
        registry.choices = list(dict.fromkeys([BUNDLED_NAME] + registry.choices))
        try:
            registry.get(BUNDLED_NAME)
            return registry, f"⚠️ {failed} could not be loaded. {reason} Serving the bundled offline model (Fashion-MNIST) instead."
        except ModelLoadError as e:
            reason += f" The bundled model failed too: {e}"
    return registry, (
        f"⚠️ {registry.default} could not be loaded. {reason} No offline model is bundled: set VIT_DEMO_MODEL to a local "
        "folder holding a ViT checkpoint (config.json and model.safetensors) and restart."
    )


def build_demo(registry: Registry | None = None) -> gr.Blocks:
    """Builds the page. `registry` defaults to the models named by the environment (see registry.py)."""
    registry, notice = start_registry(registry or Registry.from_env())
    default = registry.default
    try:
        cfg = registry.get(default).config
        depth, heads = cfg.depth, cfg.num_heads
    except ModelLoadError:  # nothing could be loaded: the page says why
        depth, heads = 12, 12

    def get_model(name):
        try:
            return registry.get(name)
        except ModelLoadError as e:
            raise gr.Error(str(e)) from e

    def need(image):
        if image is None:
            raise gr.Error("No image yet: upload a photo, take one with the webcam, paste one, or pick an example.")
        return image

    @gpu
    def classify(image: str, top_k: int = 5, model: str = default):
        """Top-k classes of an image. Returns the probabilities for a gr.Label."""
        path = need(image)
        clf = get_model(model)
        start = time.perf_counter()
        try:  # the upload's path is named by a hash of its content, so it keys the work kept for /explain
            top = clf.predict(path, k=int(top_k), key=path)
        except (OSError, SyntaxError) as e:
            raise gr.Error(UNREADABLE) from e
        ms = 1000 * (time.perf_counter() - start)
        precision = "" if clf.dtype == torch.float32 else f" in {str(clf.dtype).removeprefix('torch.')}"
        info = f"**{registry.check_allowed(model)}** answered in {ms:.0f} ms on {clf.device.type.upper()}{precision}."
        return {label: score for label, score in top}, info

    @gpu
    def explain(
        image: str,
        method: str = "rollout",
        model: str = default,
        layer: int = depth,
        head: str = "mean",
        head_fusion: str = "mean",
        discard_ratio: float = DEFAULT_DISCARD_RATIO,
        alpha: float = 0.6,
    ):
        """Where the model looked, over the crop it saw. Returns the overlay (and the crop, for the page)."""
        path = need(image)
        clf = get_model(model)
        try:
            crop, attns, _ = clf.attention(path, key=path)
        except (OSError, SyntaxError) as e:
            raise gr.Error(UNREADABLE) from e
        scale = -(-MIN_VIEW // max(crop.shape[1:]))  # small crops (28x28) are enlarged, pixels kept sharp
        if scale > 1:
            crop = crop.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (C, H * s, W * s)
        layer = min(max(int(layer), 1), clf.config.depth) - 1
        head_idx = None if head in (None, "", "mean") else min(max(int(head), 1), clf.config.num_heads) - 1
        overlay = render(crop, attns, clf.config.num_prefix_tokens, method, layer=layer, head=head_idx,
                         head_fusion=head_fusion, discard_ratio=float(discard_ratio), alpha=float(alpha))
        return overlay, Image.fromarray(crop.permute(1, 2, 0).squeeze(-1).numpy())

    def on_model_change(name, progress=gr.Progress()):
        progress(0, desc=f"Loading {name} (the first time, it is downloaded from the Hugging Face Hub)")
        clf = get_model(name)
        c = clf.config
        return (
            gr.Slider(maximum=c.depth, value=c.depth),
            gr.Dropdown(choices=["mean"] + [str(h + 1) for h in range(c.num_heads)], value="mean"),
            f"Loaded **{name}**: {c.depth} layers, {c.num_heads} heads, {c.img_size}px input, {len(clf.labels)} classes.",
        )

    with gr.Blocks(title="vit-demo: Vision Transformer") as demo:
        gr.Markdown(
            "# vit-demo: see how a Vision Transformer sees\n"
            "Give it a photo: it is cut into patches, the transformer attends between them, and the class token's "
            "final state is classified. **Classify** shows the top classes; **Attention** shows where it looked."
        )
        gr.Markdown(notice, elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                image = PhotoInput(
                    label="Photo", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                    webcam_options=gr.WebcamOptions(mirror=False), elem_id="photo", height=360,
                )
                gr.Markdown("Webcam photos are used as the camera sees them (not mirrored).", elem_id="webcam-note")
                model = gr.Dropdown(
                    choices=registry.choices, value=default, label="Model", elem_id="model",
                    allow_custom_value=True,  # Registry.check_allowed refuses what is not on offer, in its own words
                    info="Any Hub id of a ViT may be typed in." if registry.allow_any else None,
                )
                model_info = gr.Markdown(elem_id="model-info")
                examples = sorted(f for f in os.listdir(EXAMPLES_DIR) if f.lower().endswith((".jpg", ".jpeg", ".png")))
                gr.Examples([[os.path.join(EXAMPLES_DIR, f)] for f in examples], inputs=[image], label="Examples", examples_per_page=12)
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Classify", id="classify"):
                        top_k = gr.Slider(1, 20, value=5, step=1, label="Top k", elem_id="top-k")
                        classify_btn = gr.Button("Classify", variant="primary", elem_id="classify-btn")
                        label = gr.Label(num_top_classes=20, label="Top classes", elem_id="label")
                        answered = gr.Markdown(elem_id="answered")
                    with gr.Tab("Attention", id="attention"):
                        method = gr.Radio(METHOD_CHOICES, value="rollout", label="Method", elem_id="method")
                        with gr.Row():
                            layer = gr.Slider(1, depth, value=depth, step=1, label="Layer (attention, heads)", elem_id="layer")
                            head = gr.Dropdown(["mean"] + [str(h + 1) for h in range(heads)], value="mean", label="Head (attention)", elem_id="head")
                        with gr.Row():
                            head_fusion = gr.Radio(list(HEAD_FUSIONS), value="mean", label="Head fusion (rollout)", elem_id="head-fusion")
                            discard_ratio = gr.Slider(0, 0.99, value=DEFAULT_DISCARD_RATIO, step=0.01, label="Discard ratio (rollout)", elem_id="discard")
                        alpha = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity", elem_id="alpha")
                        explain_btn = gr.Button("Explain", variant="primary", elem_id="explain-btn")
                        with gr.Row():
                            overlay = gr.Image(label="Where it looked", type="pil", format="png", elem_id="overlay", interactive=False)
                            crop = gr.Image(label="The crop the model saw", type="pil", format="png", elem_id="crop", interactive=False)
        # Extra outputs travel through State and a private follow-up event, so /classify returns just the Label
        # and /explain just the image (gradio_client does not see State).
        info_state, crop_state = gr.State(), gr.State()
        # Up to MAX_BATCH visitors' images are decoded side by side, each in its own worker (a bad file fails
        # only its own request), and their forward passes are shared (runtime.Batcher). Gradio's own batch=True
        # is not used: one unreadable upload would fail its whole batch, and the per-request `validator` that
        # could screen uploads first does not accept batched events (Gradio 6.31).
        classify_btn.click(classify, [image, top_k, model], [label, info_state], api_name="classify",
                           concurrency_limit=MAX_BATCH, concurrency_id="classify").then(
            lambda info: info, info_state, answered, api_name="show_info", api_visibility="private"
        )
        explain_inputs = [image, method, model, layer, head, head_fusion, discard_ratio, alpha]
        explain_btn.click(explain, explain_inputs, [overlay, crop_state], api_name="explain").then(
            lambda c: c, crop_state, crop, api_name="show_crop", api_visibility="private"
        )

        def explain_live(image, *args):  # redraw as the controls move, once there is a photo
            return (gr.skip(), gr.skip()) if image is None else explain(image, *args)

        for control in (method, layer, head, head_fusion, discard_ratio, alpha):
            control.change(explain_live, explain_inputs, [overlay, crop], api_name=f"explain_on_{control.elem_id.replace('-', '_')}",
                           api_visibility="private", show_progress="hidden", trigger_mode="always_last")
        # Reading the upload at once tells the visitor about an unreadable file before they press a button.
        image.upload(lambda im: None, image, None, api_name="check_upload", api_visibility="private", show_progress="hidden")
        model.change(on_model_change, model, [layer, head, model_info], api_name="select_model", api_visibility="private")
    demo.queue(max_size=64, default_concurrency_limit=4)
    demo.registry = registry
    return demo
