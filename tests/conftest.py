"""Shared helpers: reference models saved exactly as their libraries publish them, and a Hub cache laid out by hand.

Nothing here reaches the network: every checkpoint is made by the reference library (transformers, timm,
torchvision) with random weights, then loaded through vit_demo and compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Comparisons with the reference libraries are made in float32, whatever this CPU is fast at;
# tests/test_precision.py sets the variable itself to test the automatic choice.
os.environ.setdefault("VIT_DEMO_PRECISION", "float32")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> float:
    """Asserts max |actual - expected| <= atol and returns that difference; the message prints it."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol:g}"
    return diff


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter random values (LayerNorm gains and biases too), so that a misplaced bias,
    a swapped q/k/v or a wrong eps cannot hide behind an initialisation of ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.02
            p.copy_(1.0 + 10 * noise if (name.endswith("weight") and p.ndim == 1) else p + noise)
    return model.eval()


@dataclass
class Reference:
    """A checkpoint on disk and the reference library's own model and preprocessing for it."""

    path: Path  # a folder laid out like a Hub repo, or a weights file
    model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # input -> logits, through the reference model
    input_size: int
    in_chans: int = 3


def make_transformers(out: Path, size: str = "small", distilled: bool = False, **overrides) -> Reference:
    """transformers ViTForImageClassification / DeiTForImageClassificationWithTeacher, save_pretrained'd."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor

    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
    if size == "base":
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000)
    dims.update(overrides)
    cls_config, cls_model, cls_proc = (DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor) if distilled else (ViTConfig, ViTForImageClassification, ViTImageProcessor)
    model = randomize_(cls_model(cls_config(**dims)))
    model.save_pretrained(out)
    s = dims["image_size"]
    if distilled:
        cls_proc(size={"height": s * 8 // 7, "width": s * 8 // 7}, crop_size={"height": s, "width": s}).save_pretrained(out)
    else:
        cls_proc(size={"height": s, "width": s}).save_pretrained(out)
    return Reference(out, model, lambda x: model(pixel_values=x).logits, s, dims.get("num_channels", 3))


def make_timm(out: Path, arch: str = "vit_tiny_patch16_224", **kwargs) -> Reference:
    """A timm model saved with timm's own save_for_hf (config.json with architecture and pretrained_cfg)."""
    import timm
    from timm.models import save_for_hf

    model = randomize_(timm.create_model(arch, pretrained=False, **kwargs))
    save_for_hf(model, str(out), safe_serialization=True)
    return Reference(out, model, model, model.patch_embed.img_size[0])


def make_torchvision(out: Path, size: str = "small", arch: str = "vit_b_16", suffix: str = ".pth") -> Reference:
    """A torchvision VisionTransformer's state dict, saved as torchvision publishes it (a .pth file)."""
    import torchvision
    from safetensors.torch import save_file

    if size == "small":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=128, mlp_dim=256, num_classes=10)
    else:
        model = getattr(torchvision.models, arch)(weights=None)
    randomize_(model)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{arch}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return Reference(path, model, model, model.image_size)


LABELS = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape"]


def make_fruit_reference(out: Path) -> Reference:
    """A small transformers ViT (224 px, 32 px patches) with 7 named classes, as the app tests serve it."""
    return make_transformers(
        out, "small", image_size=224, patch_size=32, num_labels=7,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )


def make_fruit_checkpoint(out: Path) -> Path:
    """make_fruit_reference's folder."""
    return make_fruit_reference(out).path


def confidences(result) -> list[tuple[str, float]]:
    """A gr.Label's value, as gradio_client returns it -> [(label, confidence), ...], best first."""
    assert isinstance(result, dict) and "confidences" in result, result
    return [(c["label"], c["confidence"]) for c in result["confidences"]]


def with_garbage_exif(image: Image.Image, fmt: str) -> bytes:
    """`image` as a PNG (with an eXIf chunk) or WebP (with an EXIF chunk) whose EXIF block is not TIFF data."""
    garbage = b"this is not a TIFF header" * 4
    buf = io.BytesIO()
    if fmt == "WEBP":
        image.save(buf, "WEBP", lossless=True, exif=garbage)
        return buf.getvalue()
    image.save(buf, "PNG")
    png = buf.getvalue()
    chunk = struct.pack(">I", len(garbage)) + b"eXIf" + garbage + struct.pack(">I", zlib.crc32(b"eXIf" + garbage))
    return png[:-12] + chunk + png[-12:]  # before IEND (12 bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def hold_first_pass(batcher, waiting: int) -> list[int]:
    """Wraps a runtime.Batcher's forward so that its first pass holds until `waiting` callers queue behind it.
    Returns the batch sizes of the passes, filled in as they run."""
    forward, seen = batcher.forward, []

    def held(x):
        seen.append(x.shape[0])
        if len(seen) == 1:
            wait_until(lambda: len(batcher._waiting) >= waiting)
        return forward(x)

    batcher.forward = held
    return seen


@contextlib.contextmanager
def launched(registry, tmp: Path):
    """The real app for `registry` on a free loopback port, with its own temp folders; yields (demo, url)."""
    from vit_demo.ui import LAUNCH_KWARGS, build_demo

    with pytest.MonkeyPatch.context() as mp:
        (tmp / "gradio").mkdir(exist_ok=True)
        mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))  # gradio_client and gradio write files per request
        mp.setenv("TMPDIR", str(tmp))
        demo = build_demo(registry)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **LAUNCH_KWARGS)
        try:
            yield demo, url
        finally:
            demo.close(verbose=False)


@contextlib.contextmanager
def logged_to(log_file: Path):
    """Every log line of the process (the app's, Gradio's, uvicorn's) also goes to `log_file`, at INFO."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        yield log_file
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def lay_out_hub_cache(hf_home: Path, repo_id: str, folder: Path, only: tuple[str, ...] | None = None) -> str:
    """Puts a folder's files (or `only` these) into a Hugging Face cache as a download of `repo_id` would;
    returns the commit hash.

        $HF_HOME/hub/models--ORG--NAME/snapshots/<sha>/<files>,  refs/main -> <sha>
    """
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if only is None or f.name in only:
            shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return sha


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, with HF_HUB_OFFLINE=1 for this process."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    (hf_home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


class FakeHub(list):
    """The requests a loopback Hub got (a list of paths), and the repos it serves (`serve`)."""

    def __init__(self, hf_home: Path):
        super().__init__()
        self.hf_home = hf_home  # its cache is hf_home / "hub", as lay_out_hub_cache lays one out
        self.repos: dict[str, tuple[str, Path]] = {}
        self.broken: dict[str, int] = {}  # file name -> the status it answers with (0: the connection is dropped)
        self.sent = 0  # body bytes sent, all requests together

    def serve(self, repo_id: str, folder: Path) -> str:
        """Serves a folder's files as `repo_id` at one commit; returns the commit hash (lay_out_hub_cache's)."""
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = (sha, folder)
        return sha


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and a Hub on loopback that answers like the real one for missing and gated
    repos and revisions, serves the repos given to `fake_hub.serve`, and counts the requests it gets."""
    from huggingface_hub import constants

    hub = FakeHub(tmp_path / "fake-hub-home")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hub.append(self.path)
            broken = next((code for name, code in hub.broken.items() if self.path.endswith("/" + name)), None)
            if broken == 0:
                self.close_connection = True
                return self.connection.shutdown(socket.SHUT_RDWR)
            if broken is not None:
                return self._send(broken, b'{"error": "down"}', {})
            served = self._served()
            if served is not None:
                return self._send(200, *served)
            gated = "gated" in self.path
            code = "GatedRepo" if gated else "RevisionNotFound" if "no-such-revision" in self.path else "RepoNotFound"
            self._send(403 if gated else 404, b'{"error": "no"}', {"X-Error-Code": code})

        def do_HEAD(self):
            self.do_GET()

        def _served(self):
            """(body, headers) for model_info of a served repo or one of its files; 404 EntryNotFound for others."""
            for repo_id, (sha, folder) in hub.repos.items():
                if self.path.startswith(f"/api/models/{repo_id}"):
                    siblings = [{"rfilename": f.name} for f in folder.iterdir()]
                    return json.dumps({"id": repo_id, "sha": sha, "siblings": siblings}).encode(), {}
                prefix = f"/{repo_id}/resolve/"
                if self.path.startswith(prefix):
                    name = self.path[len(prefix):].split("/", 1)[1]
                    if not (folder / name).is_file():
                        return b'{"error": "no"}', {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha, "status": 404}
                    body = (folder / name).read_bytes()
                    headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
                    ranged = self.headers.get("Range", "").removeprefix("bytes=").split("-")
                    if self.command == "GET" and len(ranged) == 2 and ranged[0].isdigit():  # a range request
                        start, end = int(ranged[0]), int(ranged[1]) if ranged[1].isdigit() else len(body) - 1
                        body, headers["status"] = body[start:end + 1], 206
                    return body, headers
            return None

        def _send(self, status: int, body: bytes, headers: dict):
            self.send_response(headers.pop("status", status))
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json" if body.startswith(b"{") else "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)
                hub.sent += len(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield hub
    server.shutdown()
    server.server_close()


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NO_FASHION_MNIST = "Fashion-MNIST is not installed (Debian: apt-get install dataset-fashion-mnist); CI installs it."


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Fashion-MNIST folder; the tests that need it fail (they do not skip) where it is missing."""
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(NO_FASHION_MNIST, pytrace=False)
    return FASHION_MNIST


@pytest.fixture(scope="session")
def photo():
    from PIL import Image

    return Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")


# --- the launched app over raw HTTP, and in a real browser ----------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots, git-ignored
RAW_TIMEOUT = 120


def raw_call(url: str, api: str, data: list, headers: dict | None = None, listen: bool = True) -> tuple[str, object]:
    """A raw `call` request (no client, no defaults) and its event stream: ("complete", output) or ("error", message);
    ("refused", the reply's text) when the call is not admitted; ("sent", event id) when not listening."""
    import json

    import httpx

    r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, headers=headers, timeout=RAW_TIMEOUT)
    if r.status_code != 200:
        return "refused", r.text
    event_id = r.json()["event_id"]
    if not listen:
        return "sent", event_id
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{event_id}", headers=headers, timeout=RAW_TIMEOUT) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                return event, (payload.get("error") if isinstance(payload, dict) and event == "error" else payload)
    return "lost", None


def rss_mb() -> float:
    """This process's resident memory, from /proc/self/status (VmRSS, in kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def raw_upload(url: str, path: str) -> dict:
    """Uploads a file as the page does; returns the FileData an API call names it by."""
    import httpx

    with open(path, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files=[("files", (Path(path).name, f))], timeout=RAW_TIMEOUT)
    assert r.status_code == 200, r.text
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


def require_chromium() -> None:
    """The browser tests fail (they do not skip) where Chromium is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: the browser tests need it "
                    "(apt-get install -y chromium chromium-driver).", pytrace=False)


@contextlib.contextmanager
def chromium(*extra_flags: str):
    """Headless Chromium (Debian's, driven by Playwright) for as long as the block runs."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS + list(extra_flags))
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)

