"""The page: a photo and the model choice on the left, the tabs on the right; and the registry it serves.

`build_demo` assembles the parts; each tab lives in a module of its own. Every event has an `api_name`; the
public endpoints are `/classify` (image, top_k, model -> Label) and `/explain` (image, method, ... -> image),
and every input after the image has a default, so `client.predict(image=handle_file(p), api_name="/classify")`
works.
"""

from __future__ import annotations

import os

import gradio as gr
from starlette.middleware import Middleware

from ..hub import ModelLoadError
from ..registry import BUNDLED_NAME, Registry, bundled_available
from . import attention, checks, classify
from .common import Shared
from .guard import EXAMPLES_DIR, PhotoInput
from .server import RequestLimits, cache_lifespan, cache_seconds

MAX_FILE_SIZE = "20mb"
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


class Page(gr.Blocks):
    """gr.Blocks that brings its own protections to every launch, and answers every input error in a sentence.

    - `launch` adds the request limits and the cache sweep of `server.py`, however the page is launched.
    - Failures of Gradio's own input handling (too few inputs, a file outside the upload cache, a value of the
      wrong shape) become one sentence instead of a bare "Error".
    """

    def launch(self, *args, app_kwargs: dict | None = None, **kwargs):
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(RequestLimits)]
        app_kwargs.setdefault("lifespan", cache_lifespan(self.GRADIO_CACHE, self._kept_files))
        return super().launch(*args, app_kwargs=app_kwargs, **kwargs)

    def _kept_files(self) -> set[str]:
        return {f for block in self.blocks.values() for f in getattr(block, "keep_in_cache", ())}

    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception as e:
            raise checks.translate(e, block_fn.inputs, len(inputs)) from e


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
    try:
        cfg = registry.get(registry.default).config
        depth, heads = cfg.depth, cfg.num_heads
    except ModelLoadError:  # nothing could be loaded: the page says why
        depth, heads = 12, 12
    lifetime = cache_seconds()
    with Page(title="vit-demo: Vision Transformer", delete_cache=(max(1, min(60, lifetime // 4)), lifetime)) as demo:
        gr.Markdown(
            "# vit-demo: see how a Vision Transformer sees\n"
            "Give it a photo: it is cut into patches, the transformer attends between them, and the class token's "
            "final state is classified. **Classify** shows the top classes; **Attention** shows where it looked."
        )
        gr.Markdown(notice, elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                photo, model, model_info = _photo_and_model(registry)
            shared = Shared(registry, photo, model)
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Classify", id="classify"):
                        classify.build(shared)
                    with gr.Tab("Attention", id="attention"):
                        controls = attention.build(shared, depth, heads)
        # Reading the upload at once tells the visitor about an unreadable file before they press a button.
        photo.upload(lambda im: None, photo, None, api_name="check_upload", api_visibility="private", show_progress="hidden")

        def on_model_change(name, progress=gr.Progress()):
            progress(0, desc=f"Loading {checks.short(name)} (the first time, it is downloaded from the Hugging Face Hub)")
            c = shared.classifier(name).config
            return (
                gr.Slider(maximum=c.depth, value=c.depth),
                gr.Dropdown(choices=["mean"] + [str(h + 1) for h in range(c.num_heads)], value="mean"),
                f"Loaded **{shared.display_name(name)}**: {c.depth} layers, {c.num_heads} heads, {c.img_size}px input.",
            )

        model.change(on_model_change, model, [controls["layer"], controls["head"], model_info], api_name="select_model",
                     api_visibility="private")
    demo.queue(max_size=64, default_concurrency_limit=4)
    demo.registry = registry
    return demo


def _photo_and_model(registry: Registry):
    photo = PhotoInput(
        label="Photo", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
        webcam_options=gr.WebcamOptions(mirror=False), elem_id="photo", height=360,
    )
    gr.Markdown("Webcam photos are used as the camera sees them (not mirrored).", elem_id="webcam-note")
    model = checks.Dropdown(
        choices=registry.choices, value=registry.default, label="Model", elem_id="model",
        allow_custom_value=True,  # Registry.check_allowed refuses what is not on offer, in its own words
        info="Any Hub id of a ViT may be typed in." if registry.allow_any else None,
    )
    model_info = gr.Markdown(elem_id="model-info")
    examples = sorted(f for f in os.listdir(EXAMPLES_DIR) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    gr.Examples([[os.path.join(EXAMPLES_DIR, f)] for f in examples], inputs=[photo], label="Examples", examples_per_page=12)
    return photo, model, model_info
