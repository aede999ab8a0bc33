"""The page: a photo and the model choice on the left, the tabs on the right; and the registry it serves.

`build_demo` assembles the parts; each tab lives in a module of its own. Every event has an `api_name`; the
public endpoints are `/classify` (image, top_k, model -> Label) and `/explain` (image, method, ... -> image),
and every input after the image has a default, so `client.predict(image=handle_file(p), api_name="/classify")`
works.

The page answers on input. A new photo (upload, webcam, paste, example) first empties every result of the old
one, then passes the guard (an unreadable file is refused and taken off the page), then each tab's photo
handler runs (`Shared.on_photo`). A model choice is loaded first; if it fails, the dropdown goes back to the
model that was serving and says why; if it loads, the tabs' model handlers run, then the photo handlers.
"""

from __future__ import annotations

import html
import inspect
import logging
import os
import typing

import gradio as gr
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from starlette.middleware import Middleware

from ..classifier import NotANumber
from ..hub import ModelLoadError
from ..registry import BUNDLED_NAME, Registry, bundled_available
from ..runtime import warm_up
from . import attention, checks, classify, inside, live
from .common import Shared, display_names, facts, without_paths
from .guard import EXAMPLES_DIR, PhotoInput, warm
from . import fair
from .server import RequestLimits, cache_lifespan, cache_seconds, guarded_server

log = logging.getLogger("vit_demo.ui")

MAX_FILE_SIZE = "20mb"
HEADER = (
    "# vit-demo: how a Vision Transformer sees\n"
    "Give it a photo: the transformer cuts it into patches, attends between them and names what it sees. "
    "**Classify** shows the top classes, **Attention** where it looked."
)
# On a phone the columns stack: the photo comes first, then the tabs (the answer, the map), then the model choice
# and the examples. The left column's parts become items of the stacked row so that the tabs can sit between them.
CSS = """
#status:empty, #model-note:empty {display: none}
#webcam-note {font-size: 0.85em; opacity: 0.8}
#model input {text-overflow: ellipsis; overflow: hidden; white-space: nowrap; padding-right: 2.2em}
#model-info {font-size: 0.85em}
#fallback-note {border-left: 4px solid var(--color-accent); padding-left: 10px; background: var(--color-accent-soft)}
#status {font-size: 0.9em}
#label .answer {margin: 4px 0 8px}
#label .top-class {font-size: 1.5em; font-weight: 700}
#label .top-pct {font-size: 1.1em; opacity: 0.8; margin-left: 0.4em}
#label table.probs {width: 100%; border-collapse: collapse; font-size: 0.92em; border: none; margin: 0}
#label table.probs tr, #label table.probs td {padding: 2px 4px; border: none !important; background: none !important; vertical-align: middle}
#label td.name {width: 45%; overflow-wrap: anywhere}
#label td.bar {width: 40%}
#label td.bar span {display: block; height: 0.7em; min-width: 1px; border-radius: 3px; background: var(--color-accent)}
#label td.pct {width: 15%; text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap}
#colour-bar .colour-bar {display: flex; align-items: center; gap: 8px; font-size: 0.85em}
#colour-bar .ramp {flex: 1; height: 12px; border-radius: 3px}
#colour-bar .scale-note {font-size: 0.8em; opacity: 0.75}
@media (max-width: 768px) {
  h1 {font-size: 1.35em !important; margin-bottom: 0.2em !important}
  #intro p, #status {font-size: 0.85em}
  #main-row {flex-direction: column}
  #photo-col {display: contents}
  #photo-col > * {order: 3}
  #photo-col > #photo {order: 1}
  #tabs-col {order: 2}
}
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
# The key of a photo value in the browser: its server path (uploads are named by their content), "" for none.
PHOTO_KEY = "(photo) => photo ? String(photo.path || photo.url || '') : ''"
# Where the answer to an example is out of view (a phone, whose single column puts it above the examples), scroll
# to it once it has come (the page's height changes until then).
SHOW_ANSWER_JS = """() => {
  const before = document.querySelector('#label')?.innerText;
  const started = Date.now();
  let moved = false;  // the visitor has tapped, scrolled or typed since: leave the page where they put it
  const stop = () => { moved = true; };
  const events = ['pointerdown', 'wheel', 'touchmove', 'keydown'];
  setTimeout(() => events.forEach(e => window.addEventListener(e, stop, {once: true, passive: true})), 0);
  const wait = () => {
    const answer = document.querySelector('#label .top-class');
    const col = document.querySelector('#tabs-col');
    const done = moved || (answer && col && document.querySelector('#label').innerText !== before);
    if (done && !moved) {
      const top = col.getBoundingClientRect().top;
      if (top < 0 || top > window.innerHeight / 2) col.scrollIntoView({block: 'start'});
    }
    if (!done && Date.now() - started < 30000) setTimeout(wait, 100);
    else events.forEach(e => window.removeEventListener(e, stop));
  };
  wait();
}"""
LAUNCH_KWARGS = dict(css=CSS, js=JS, theme=gr.themes.Soft(), max_file_size=MAX_FILE_SIZE)


class Page(gr.Blocks):
    """gr.Blocks that brings its own protections to every launch, and answers every input error in a sentence.

    - `launch` adds the request and connection limits and the cache sweep of `server.py`, however the page is
      launched; `queue` is Gradio's queue with the lanes and per-client bounds of `fair.py`.
    - Failures of Gradio's own input handling (too few inputs, a file outside the upload cache, a value of the
      wrong shape) become one sentence instead of a bare "Error".
    - An event a raw request calls out of turn (a browser-only event, an example that is not one) is refused in
      a sentence too; private follow-ups that show a State change nothing when called on their own (`relay`).
    """

    def launch(self, *args, app_kwargs: dict | None = None, **kwargs):
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(RequestLimits)]
        app_kwargs.setdefault("lifespan", cache_lifespan(self.GRADIO_CACHE, self._kept_files))
        kwargs.setdefault("state_session_capacity", fair.Policy.from_env().sessions)
        fair.raise_open_files()
        fair.limit_log()
        with guarded_server() as self.connections:
            return super().launch(*args, app_kwargs=app_kwargs, **kwargs)

    @property
    def state_holder(self):
        try:
            return self.__dict__["state_holder"]
        except KeyError:
            raise AttributeError("state_holder") from None

    @state_holder.setter
    def state_holder(self, holder) -> None:
        """Gradio's app hands the page its store of session states here: new sessions then cost little."""
        self.__dict__["state_holder"] = fair.SessionStates.adopt(holder)

    def queue(self, *args, **kwargs):
        super().queue(*args, **kwargs)
        fair.FairQueue.replace(self)
        return self

    def get_api_info(self, all_endpoints: bool = False, page: str | None = None):
        """Gradio's API description, except that an input with an `api_default` attribute documents that default
        to API callers (and gradio_client sends it when the caller leaves the input out) instead of the page's
        first value: the layer slider starts at the default model's depth, while a caller who names another
        model and no layer means that model's last layer."""
        info = super().get_api_info(all_endpoints, page)
        for fn in self.fns.values():
            endpoint = info["named_endpoints"].get(f"/{fn.api_name}")
            if endpoint is None:
                continue
            inputs = [block for block in fn.inputs if not getattr(block, "skip_api", False)]
            for block, parameter in zip(inputs, endpoint["parameters"]):
                if hasattr(block, "api_default"):
                    parameter["parameter_has_default"], parameter["parameter_default"] = True, block.api_default
        return info

    def _kept_files(self) -> set[str]:
        return {f for block in self.blocks.values() for f in getattr(block, "keep_in_cache", ())}

    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception as e:
            raise checks.translate(e, block_fn.inputs, len(inputs)) from e

    async def call_function(self, block_fn, processed_input, *args, **kwargs):
        fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
        if not fn.fn:  # an event the page runs in the browser, called by a raw request
            raise checks.refusal("This event runs in the browser only: there is nothing to call on the server.")
        if any(isinstance(b, gr.Dataset) for b in fn.inputs) and None in processed_input:
            raise checks.refusal("There is no such example: pick one of the examples on the page.")
        bound = inspect.signature(gr.Blocks.call_function).bind(self, block_fn, processed_input, *args, **kwargs)
        data = getattr(bound.arguments.get("event_data"), "_data", None)
        if _takes_select_data(fn.fn) and not (isinstance(data, dict) and {"index", "value"} <= data.keys()):
            raise checks.refusal("This event's data is not what the page sends: use the page.")
        try:
            return await super().call_function(block_fn, processed_input, *args, **kwargs)
        except gr.Error:
            raise
        except NotANumber as e:  # the model failed on this photo: its sentence
            raise checks.refusal(str(e)) from e
        except Exception as e:  # escaped the app's checks: one sentence, and the log's rate limit
            raise fair.escaped(e) from e


def _unreachable(error: BaseException | None) -> bool:
    """Whether a load failed because the Hub could not be reached at all (not a refusal that the Hub sent)."""
    while error is not None:
        if isinstance(error, HfHubHTTPError) or getattr(error, "response", None) is not None:
            return False  # the Hub answered (gated, not found, ...): other models may well load
        if isinstance(error, (HTTPError, TimeoutError, ConnectionError)):
            return True
        error = error.__cause__
    return False


def _takes_select_data(fn) -> bool:
    try:
        return gr.SelectData in typing.get_type_hints(fn).values()
    except (NameError, TypeError):
        return False


def start_registry(registry: Registry) -> tuple[Registry, str, bool]:
    """Loads the default model; when that fails, serves the bundled model and says why.

    Returns:
        (the registry, a notice for the page ("" when the default loaded), whether the Hub is out of reach:
        HF_HUB_OFFLINE is set, or it could not be reached for the default model).
    """
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        warm_up(registry.get(registry.default))
        log.info("Serving %s.", registry.default)
        return registry, "", offline
    except ModelLoadError as e:
        reason = str(e)
        offline = offline or _unreachable(e)
    failed = registry.default

    def shown(text: str) -> str:  # a reason may quote the checkpoint's own text: shown as text, without paths
        return checks.text(without_paths(text, display_names(registry.choices)))

    if bundled_available():
        registry.make_default(BUNDLED_NAME)
        try:
            warm_up(registry.get(BUNDLED_NAME))
            log.warning("%s could not be loaded: %s Serving the bundled offline model instead.", failed, reason)
            return registry, f"⚠️ **Serving the bundled offline model (Fashion-MNIST).** {failed} could not be loaded: {shown(reason)}", offline
        except ModelLoadError as e:
            reason += f" The bundled model failed too: {e}"
    log.error("%s could not be loaded, and no model is served: %s", failed, reason)
    return registry, (
        f"⚠️ {failed} could not be loaded. {shown(reason)} No offline model is bundled: set VIT_DEMO_MODEL to a local "
        "folder holding a ViT checkpoint (config.json and model.safetensors) and restart."
    ), offline


def build_demo(registry: Registry | None = None) -> gr.Blocks:
    """Builds the page. `registry` defaults to the models named by the environment (see registry.py)."""
    warm()  # the decode workers start while the models load and the page is built
    registry, notice, offline = start_registry(registry or Registry.from_env())
    try:
        serving = registry.get(registry.default)
        depth, heads = serving.config.depth, serving.config.num_heads
    except ModelLoadError:  # nothing could be loaded: the page says why
        serving, depth, heads = None, 12, 12
    names = display_names(registry.choices)
    lifetime = cache_seconds()
    with Page(title="vit-demo: Vision Transformer", delete_cache=(max(1, min(60, lifetime // 4)), lifetime)) as demo:
        gr.Markdown(HEADER, elem_id="intro")
        gr.Markdown(without_paths(notice, names), elem_id="status")
        with gr.Row(elem_id="main-row"):
            with gr.Column(scale=1, elem_id="photo-col"):
                photo = PhotoInput(
                    label="Photo", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                    webcam_options=gr.WebcamOptions(mirror=False), elem_id="photo", height=320,
                )
                gr.Markdown("Webcam photos are used as the camera sees them (not mirrored).", elem_id="webcam-note")
                model = _model_dropdown(registry, names, offline)
                shown = names[registry.default]
                model_info = gr.Markdown(facts(shown, registry.default, serving) if serving else "", elem_id="model-info")
                model_note = gr.Markdown(elem_id="model-note")
                _examples(photo, bundled_first=registry.default == BUNDLED_NAME)
            shared = Shared(registry, photo, model, gr.State("Classify"))
            with gr.Column(scale=1, elem_id="tabs-col"):
                with gr.Tabs(elem_id="tabs") as tabs:
                    with gr.Tab("Classify", id="classify"):
                        classify.build(shared)
                    with gr.Tab("Attention", id="attention") as attention_tab:
                        attention.build(shared, depth, heads, attention_tab)
                    with gr.Tab("Inside", id="inside") as inside_tab:
                        inside.build(shared, inside_tab)
                    with gr.Tab("Live", id="live"):
                        live.build(shared)
        _wire(shared, tabs, model_info, model_note)
    demo.queue(default_concurrency_limit=4)  # Page.queue: the lanes and bounds of fair.py
    demo.registry = registry
    return demo


def _model_dropdown(registry: Registry, names: dict[str, str], offline: bool) -> gr.Dropdown:
    """The model choice, by display names; offline, the models that could not load are left out (and counted)."""
    offered = [c for c in registry.choices if c == registry.default or not offline or registry.available(c)]
    left_out = len(registry.choices) - len(offered)
    info = "Any Hub id of a ViT may be typed in." if registry.allow_any and not offline else None
    if left_out:
        info = (f"The Hugging Face Hub is out of reach: {left_out} model{'s' if left_out > 1 else ''} not downloaded "
                "here are not offered." if left_out > 1 else
                "The Hugging Face Hub is out of reach: 1 model not downloaded here is not offered.")
    return checks.Dropdown(
        choices=[names[c] for c in offered], value=names[registry.default], label="Model", elem_id="model",
        allow_custom_value=True,  # Registry.check_allowed refuses what is not on offer, in its own words
        info=info,
    )


def _examples(photo, bundled_first: bool) -> None:
    files = sorted(f for f in os.listdir(EXAMPLES_DIR) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    label = "Examples"
    if bundled_first:  # what the bundled model was trained on comes first while it serves
        files.sort(key=lambda f: not f.startswith("fashion-mnist"))
        label = "Examples (clothing first: the bundled model knows only clothing)"
    examples = gr.Examples([[os.path.join(EXAMPLES_DIR, f)] for f in files], inputs=[photo], label=label,
                           examples_per_page=12, elem_id="examples")
    examples.dataset.click(None, js=SHOW_ANSWER_JS)  # on a phone the answer is above the examples: bring it into view


def _wire(shared: Shared, tabs: gr.Tabs, model_info, model_note) -> None:
    """The photo's and the model's events, in order (see the module doc), and which tab is open."""
    photo, model = shared.photo, shared.model
    quiet = dict(api_visibility="private", show_progress="hidden")

    def clear():
        return [None] * len(shared.results)

    def check(image):  # PhotoInput's guard read the file's header: an unreadable file was refused before this
        return None

    def handlers_after(checked, suffix: str) -> None:
        for fn, inputs, outputs, kwargs in shared.photo_handlers:
            kwargs = {**quiet, **kwargs}
            kwargs["api_name"] = f"{kwargs.get('api_name') or fn.__name__}{suffix}"
            checked.success(fn, inputs, outputs, **kwargs)

    # A new photo: the old results go at once, then the guard reads the photo; an unreadable one leaves the page.
    # The image component may report one upload twice: the browser passes on only a photo it has not seen last.
    seen = gr.Textbox(visible="hidden", elem_id="photo-key")
    photo.change(None, photo, seen, js=PHOTO_KEY, **quiet)
    changed = seen.change(clear, None, shared.results, queue=False, api_name="new_photo", **quiet)
    checked = changed.then(check, photo, None, api_name="check_photo", **quiet)
    handlers_after(checked, "")
    checked.failure(lambda: None, None, photo, queue=False, api_name="drop_photo", **quiet)

    # A model choice: loaded, or put back with the reason; once loaded, the tabs follow it.
    serving = gr.State(shared.display(shared.registry.default))
    loaded = gr.State(False)

    def load_model(name, was, progress=gr.Progress()):
        try:
            shown = shared.display_name(name)
            progress(0, desc=f"Loading {checks.short(shown)} (the first time, it is downloaded from the Hugging Face Hub)")
            clf = shared.classifier(name)
        except gr.Error as e:  # a refusal, already logged in one line
            gr.Warning(e.message)
            tried = checks.short(name) if isinstance(name, str) else "That model"
            why = checks.text(html.unescape(e.message))  # visitor-typed names and checkpoint text, shown as text
            return was, was, gr.skip(), f"⚠️ **{checks.text(tried)}** could not be loaded: {why} Still serving **{checks.text(was)}**.", False
        return shown, shown, shared.facts(shown, clf), "", True

    def go_on(ok):
        if not ok:  # the chain stops here, silently: load_model said why
            raise gr.Error("The model did not change.", visible=False, print_exception=False)

    dep = model.input(load_model, [model, serving], [model, serving, model_info, model_note, loaded],
                      api_name="select_model", api_visibility="private", show_progress_on=model_info,
                      **fair.lane("heavy"))
    dep = dep.then(go_on, loaded, None, queue=False, api_name="model_loaded", **quiet)
    for i, (fn, inputs, outputs, kwargs) in enumerate(shared.model_handlers):
        dep = (dep.success if i == 0 else dep.then)(fn, inputs, outputs, **{**quiet, **kwargs})
    cleared = (dep.then if shared.model_handlers else dep.success)(clear, None, shared.results, queue=False,
                                                                    api_name="model_clear", **quiet)
    handlers_after(cleared.then(check, photo, None, api_name="model_check_photo", **quiet), "_after_model")

    def opened(evt: gr.SelectData = None):  # None: a raw request without the tab's event data
        return evt.value if isinstance(getattr(evt, "value", None), str) else gr.skip()

    tabs.select(opened, None, shared.open_tab, queue=False, api_name="open_tab", **quiet)
