"""The "Live" tab: the webcam, classified continuously, with an optional live attention map.

The webcam is a streaming gr.Image. While the visitor streams, the page sends a frame every FRAME_EVERY_S seconds
(a JPEG data: URL in a POST to /gradio_api/stream/<event id>; the page puts each frame in twice, as the value and
as event data: about 60 kB at the 320x240 the camera is asked for, 175 kB at 640x480, under server.py's 1 MB
request limit up to about 1280x720) and the private `live` event answers it with the top classes. One stream
is one queued event: it ends when the visitor presses Stop or leaves the page (Gradio closes the streams of a
session whose heartbeat connection drops). Every LIVE_SECONDS the stream goes back to the queue and the page
rejoins it at once, so that visitors waiting while MAX_STREAMS streams run get their turn.

When the model is slower than the camera, frames are dropped, not queued: the page sends frames at its own pace,
and Gradio keeps one pending frame per stream, each new one replacing the last, and answers the latest when
the previous answer is out. The label is always about a frame at most one answer old.

Each frame goes through `Classifier.predict`, whose runtime batches concurrent callers: live visitors and uploads
share forward passes. With the map on, one pass of the explicit attention path gives both the classes and the
map (that path returns the attention maps, which the batched runtime does not).

Frames are hostile input like any upload: `guard.LiveFrame` takes only a JPEG, PNG or WebP data: URL, reads its header
before decoding, refuses frames over MAX_FRAME_MEGAPIXELS, and decodes under the page's decode budget. The map
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
from ..runtime import MAX_BATCH
from . import checks
from .common import Shared, gpu
from .guard import BUDGET, Frame, LiveFrame

FRAME_EVERY_S = 0.04  # the page sends a frame this often (25 a second)
LIVE_SECONDS = 60  # a stream goes back to the queue this often (the page rejoins at once)
MAX_STREAMS = MAX_BATCH  # live streams served at once; more visitors wait in the queue
TOP_K = 5
MIN_VIEW = 224  # maps of smaller crops are drawn larger, by a whole factor
# The camera is asked for 320x240: enough for a 224-pixel crop, and 25 frames a second take about 1.5 MB/s of the
# visitor's upload rather than 4.4 at 640x480 (a camera without the mode gives its nearest).
CONSTRAINTS = {"video": {"width": {"ideal": 320}, "height": {"ideal": 240}}}

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


def build(shared: Shared) -> None:
    """Builds the tab's components inside the current layout and wires the stream."""

    @gpu
    def live(frame: Frame | None, model, show_map):
        """One webcam frame -> its top classes (a Label's value), the map (or no change), a line on the timing."""
        if frame is None:
            return gr.skip(), gr.skip(), gr.skip()
        clf = shared.classifier(model)
        start = time.perf_counter()
        with BUDGET.hold(frame.nbytes):
            image = frame.decode()
            if show_map is True:
                top, overlay = attention_map(clf, image, TOP_K)
            else:
                top, overlay = clf.predict(image, k=TOP_K), gr.skip()
        ms = 1000 * (time.perf_counter() - start)
        precision = "" if clf.dtype == torch.float32 else f" in {str(clf.dtype).removeprefix('torch.')}"
        info = (f"**{checks.text(shared.display_name(model))}**: {frame.size[0]}×{frame.size[1]} frame answered in {ms:.0f} ms "
                f"on {clf.device.type.upper()}{precision}.")
        return {label: score for label, score in top}, overlay, info

    gr.Markdown(
        "Point the webcam at something and press **Record**: the top classes follow the picture, several times a "
        "second. Frames the model cannot keep up with are skipped, so the answer is about what the camera sees now. "
        "The model is the one chosen on the left.",
        elem_id="live-intro",
    )
    camera = LiveFrame(
        label="Webcam", sources=["webcam"], streaming=True, elem_id="live-camera", height=320,
        webcam_options=gr.WebcamOptions(mirror=False, constraints=CONSTRAINTS),
    )
    label = gr.Label(num_top_classes=TOP_K, label="Live: top classes", elem_id="live-label")
    info = gr.Markdown(elem_id="live-info")
    show_map = gr.Checkbox(False, label="Show where it looks (attention rollout; slower)", elem_id="live-map-on")
    live_map = LiveMap(label="Where it looks", interactive=False, visible=False, elem_id="live-map", height=320,
                       buttons=[])
    show_map.change(lambda on: gr.update(visible=on is True), show_map, live_map, queue=False, api_name="live_map_on",
                    api_visibility="private", show_progress="hidden")
    camera.stream(live, [camera, shared.model, show_map], [label, live_map, info], api_name="live",
                  api_visibility="private", stream_every=FRAME_EVERY_S, time_limit=LIVE_SECONDS,
                  concurrency_limit=MAX_STREAMS, concurrency_id="live", show_progress="hidden")
