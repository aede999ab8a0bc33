"""The "Live" tab: the webcam, classified continuously, with an optional live attention map.

The webcam is a streaming gr.Image. While the visitor streams, the page sends a frame every FRAME_EVERY_S seconds
(a JPEG data: URL in a POST to /gradio_api/stream/<event id>; the page puts each frame in twice, as the value and
as event data: about 60 kB at the 320x240 the camera is asked for, 175 kB at 640x480, under server.py's 1 MB
request limit up to about 1280x720) and the private `live` event answers it with the top classes. One stream
is one queued event: it ends when the visitor presses Stop or leaves the page (Gradio closes the streams of a
session whose heartbeat connection drops). Every LIVE_SECONDS the stream goes back to the queue and the page
rejoins it at once, so that visitors waiting for a stream's turn (fair.py bounds the streams at once, in
total and per client) get theirs.

When the model is slower than the camera, frames are dropped, not queued: the page sends frames at its own pace,
and Gradio keeps one pending frame per stream, each new one replacing the last, and answers the latest when
the previous answer is out. The label is always about a frame at most one answer old. So that frames are not
sent only to be dropped, the page paces itself by the answers (`PACE_JS`): it sends the next frame when the
answer to the last one has come, so its pace follows the pass time as measured on every frame (and with other
visitors' frames in the same passes), at most 25 frames a second (`stream_every`); a frame unanswered after
PACE_STALE_MS no longer holds the next one back.

Each visitor sees their own stream's frames per second and time per answer, as they are measured (kept in the
session's State). While the stream waits for a turn, the label says so, with
its place in the queue. On a phone the rear camera is asked for first (`facingMode: environment`); the webcam's
camera list picks another.

Each frame goes through `Classifier.predict`, whose runtime batches concurrent callers: live visitors and uploads
share forward passes. With the map on, one pass of the explicit attention path gives both the classes and the
map (that path returns the attention maps, which the batched runtime does not).

Frames are hostile input like any upload: `guard.LiveFrame` takes only a JPEG, PNG or WebP data: URL, reads its header
before decoding, refuses frames over MAX_FRAME_MEGAPIXELS, and decodes under the page's decode budget (a JPEG
over 640x480 at JPEG's own reduced scale that keeps 640x480: no model's crop needs more). The map
leaves inline (`LiveMap`, a data: URL): a stream writes nothing to the cache.
"""

from __future__ import annotations

import base64
import io
import time

import gradio as gr
import torch
from gradio.data_classes import ImageData
from PIL import Image

from .. import explain
from . import checks, fair
from .common import Shared, gpu
from .guard import BUDGET, Frame, LiveFrame
from .maps import attending

FRAME_EVERY_S = 0.04  # the page sends a frame at most this often (25 a second)
PACE_STALE_MS = 3000  # a frame still unanswered after this long no longer holds the next one back
RATE_WINDOW_S = 5.0  # frames per second are counted over the last few seconds
LIVE_SECONDS = 60  # a stream goes back to the queue this often (the page rejoins at once)
TOP_K = 5
# A refused or failed stream leaves the camera's button at "Waiting" or "Stop": press it, so that it reads "Record".
STREAM_REFUSED_JS = """() => {
  const b = document.querySelector('#live-camera button[aria-label="capture photo"]');
  if (b && !/Record/.test(b.innerText)) b.click();
}"""
MIN_VIEW = 224  # maps of smaller crops are drawn larger, by a whole factor
# The camera is asked for 320x240: enough for a 224-pixel crop, and 25 frames a second take about 1.5 MB/s of the
# visitor's upload rather than 4.4 at 640x480 (a camera without the mode gives its nearest). On a phone, the rear
# camera first: the one that points at things (a laptop's only camera is used whatever it faces).
CONSTRAINTS = {"video": {"width": {"ideal": 320}, "height": {"ideal": 240}, "facingMode": {"ideal": "environment"}}}
INTRO = (
    "Point the webcam at something and press **Record**: the top classes follow the picture, several times a "
    "second. Frames the model cannot keep up with are skipped, so the answer is about what the camera sees now. "
    "The model is the one chosen under **Model** (beside the photo; on a phone, below the tabs). On a phone the "
    "rear camera is used; to switch cameras, use the camera list under the picture."
)
# The page sends a frame only once the last one is answered (each answer changes #live-info: its count grows); the
# frames the camera gives meanwhile are not sent. Gradio's client posts each frame with fetch and ignores the reply.
PACE_JS = """
if (!window.__vitDemoPace) {
  const pace = window.__vitDemoPace = {busy: false, since: 0, held: 0};
  const send = window.fetch;
  window.fetch = function (input, init) {
    const url = String((input && input.url) || input);
    if (url.includes('/gradio_api/stream/') && !url.endsWith('/close') && init && init.method === 'POST') {
      const now = performance.now();
      if (pace.busy && now - pace.since < %d) {
        pace.held += 1;
        return Promise.resolve(new Response('{}', {status: 200, headers: {'Content-Type': 'application/json'}}));
      }
      pace.busy = true;
      pace.since = now;
    }
    return send.apply(this, arguments);
  };
  const inInfo = (node) => { const el = node && (node.nodeType === 1 ? node : node.parentElement); return el && el.closest('#live-info'); };
  new MutationObserver((changes) => { if (changes.some((c) => inInfo(c.target))) pace.busy = false; })
    .observe(document.body, {childList: true, subtree: true, characterData: true});
}
""" % PACE_STALE_MS


class LiveMap(gr.Image):
    """An output image sent inline as a JPEG data: URL: a stream makes one per frame, none is written to disk."""

    def get_block_name(self) -> str:
        return "image"

    def postprocess(self, value) -> ImageData | None:
        if not isinstance(value, Image.Image):
            return super().postprocess(value)
        buf = io.BytesIO()
        value.convert("RGB").save(buf, "JPEG", quality=85)
        return ImageData(url="data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), orig_name="map.jpeg")


def attention_map(clf, image: Image.Image, k: int) -> tuple[list[tuple[str, float]], Image.Image]:
    """The top-k classes and the attention rollout over the crop, from one pass of the explicit attention path."""
    crop, attns, logits = clf.attention(image)
    scale = -(-MIN_VIEW // max(crop.shape[1:]))  # small crops (28x28) are enlarged, pixels kept sharp
    grid = clf.grid(crop)
    if scale > 1:
        crop = crop.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (C, H * s, W * s)
    overlay = explain.render(crop, attns, clf.config.num_prefix_tokens, "rollout", grid=grid,
                             rows=clf.readout_rows(attns[0].shape[-1]))
    return clf.top_k(logits, k), overlay


def rates(stats: dict | None, now: float, ms: float) -> dict:
    """This stream's figures after one more answer: frames answered, when (the last RATE_WINDOW_S seconds), the
    time of this answer, and frames per second over that window."""
    stats = dict(stats) if isinstance(stats, dict) else {"answered": 0, "times": []}
    times = [t for t in stats.get("times", []) if now - t <= RATE_WINDOW_S] + [now]
    per_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 and times[-1] > times[0] else None
    return {"answered": int(stats.get("answered", 0)) + 1, "times": times, "ms": ms, "per_s": per_s}


def rates_line(name: str, stats: dict, frame_size, clf) -> str:
    """The line under the label: frames per second and time per answer of this visitor's stream, as measured."""
    precision = "" if clf.dtype == torch.float32 else f" in {str(clf.dtype).removeprefix('torch.')}"
    pace = f"{stats['per_s']:.1f} frames/s, " if stats["per_s"] is not None else ""
    return (f"**{checks.text(name)}**: {pace}{frame_size[0]}×{frame_size[1]} frame answered in {stats['ms']:.0f} ms on "
            f"{clf.device.type.upper()}{precision} ({stats['answered']} answered).")


def build(shared: Shared) -> None:
    """Builds the tab's components inside the current layout and wires the stream."""

    @gpu
    def live(frame: Frame | None, model, show_map, stats=None):
        """One webcam frame -> its top classes (a Label's value), the map (or no change), a line on this stream's
        frames per second and time per answer, and the stream's figures (a State of the session)."""
        if frame is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        clf = shared.classifier(model)
        start = time.perf_counter()
        with BUDGET.hold(frame.nbytes), fair.cheap_cpu(clf.device):  # the decode only: the frame is dropped once cropped
            crop = clf.crop(frame.decode())
        if show_map is True:
            with attending(clf):
                top, overlay = attention_map(clf, crop, TOP_K)
        else:
            with fair.cheap_cpu(clf.device):
                top, overlay = clf.predict(crop, k=TOP_K), gr.skip()
        done = time.perf_counter()
        stats = rates(stats, done, 1000 * (done - start))
        info = rates_line(shared.display_name(model), stats, frame.size, clf)
        return {label: score for label, score in top}, overlay, info, stats

    gr.Markdown(INTRO, elem_id="live-intro")
    gr.HTML("", js_on_load=PACE_JS, elem_id="live-pace", padding=False)
    camera = LiveFrame(
        label="Webcam", sources=["webcam"], streaming=True, elem_id="live-camera", height=320,
        webcam_options=gr.WebcamOptions(mirror=False, constraints=CONSTRAINTS),
    )
    label = gr.Label(num_top_classes=TOP_K, label="Live: top classes", elem_id="live-label")
    info = gr.Markdown(elem_id="live-info")
    stats = gr.State()  # this visitor's stream: frames answered and when
    show_map = gr.Checkbox(False, label="Show where it looks (attention rollout; slower)", elem_id="live-map-on")
    live_map = LiveMap(label="Where it looks", interactive=False, visible=False, elem_id="live-map", height=320,
                       buttons=[])
    show_map.change(lambda on: gr.update(visible=on is True), show_map, live_map, queue=False, api_name="live_map_on",
                    api_visibility="private", show_progress="hidden")
    # While the stream waits for a turn, the label shows the queue (its place, and the wait); answers replace it.
    camera.stream(live, [camera, shared.model, show_map, stats], [label, live_map, info, stats], api_name="live",
                  api_visibility="private", stream_every=FRAME_EVERY_S, time_limit=LIVE_SECONDS,
                  show_progress="minimal", show_progress_on=[label],
                  **fair.lane("cheap")).failure(  # fair.py bounds the streams, per client too
        None, js=STREAM_REFUSED_JS, api_visibility="private", queue=False)
