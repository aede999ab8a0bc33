"""`python app.py --mcp`: the public endpoints as MCP tools, driven by the `mcp` package's own streamable-HTTP client.

The app runs as its entry point starts it (a subprocess, on the bundled model, offline). Each tool call must give
what the same endpoint gives through gradio_client, pass the same checks (a bad input gets the page's sentence),
and carry a description an agent can act on.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from conftest import EXAMPLES, ROOT, confidences, free_port

BUNDLED = ROOT / "vit_demo" / "weights" / "vit-fashion-mnist"
SHOE = EXAMPLES / "fashion-mnist-sneaker-9.png"
TOOLS = {"classify", "explain", "faithfulness", "attention_distance"}


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py --mcp` on a free loopback port, serving the bundled model; its URL."""
    tmp = tmp_path_factory.mktemp("mcp")
    port = free_port()
    env = {**os.environ, "VIT_DEMO_MODEL": str(BUNDLED), "VIT_DEMO_MODELS": str(BUNDLED), "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(tmp / "gradio"), "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_MCP_SERVER", None)  # only --mcp turns it on here
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--mcp", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp / "app.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "app.py --mcp did not start in 180 s"
            try:
                if httpx.get(url + "gradio_api/mcp/schema", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def mcp_session(url: str, calls):
    """Runs `calls(session)` in an initialised MCP client session against the app; returns what it returns."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        async with streamable_http_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await calls(session)

    return asyncio.run(asyncio.wait_for(run(), timeout=240))


def test_tools_are_listed_with_descriptions_an_agent_can_act_on(app_url):
    async def calls(session):
        return (await session.list_tools()).tools

    tools = {t.name: t for t in mcp_session(app_url, calls)}
    assert TOOLS <= set(tools), sorted(tools)
    for name in TOOLS:
        tool = tools[name]
        props = tool.inputSchema["properties"]
        assert tool.inputSchema.get("required") == ["image"], (name, tool.inputSchema.get("required"))
        assert "data URL" in props["image"]["description"], name
        assert "Returns:" in tool.description, name
        for arg, schema in props.items():  # every argument is explained, not just typed
            assert len(schema.get("description", "")) > 20, (name, arg)
    explain = tools["explain"].inputSchema["properties"]
    from vit_demo.explain import METHODS

    assert explain["method"]["enum"] == list(METHODS)
    assert {"rollout", "relevance", "balanced_relevance", "libra_fullgrad"} <= set(METHODS)
    assert "from 1" in explain["layer"]["description"] and "0.99" in explain["discard_ratio"]["description"]
    assert "1 to 20" in tools["classify"].inputSchema["properties"]["top_k"]["description"]


def test_classify_tool_answers_as_the_endpoint(app_url):
    from gradio_client import Client, handle_file

    async def calls(session):
        return await session.call_tool("classify", {"image": data_url(SHOE), "top_k": 3})

    result = mcp_session(app_url, calls)
    assert not result.isError, result.content
    answer = json.loads(result.content[0].text)
    expected = Client(app_url, verbose=False).predict(image=handle_file(str(SHOE)), top_k=3, api_name="/classify")
    assert answer["label"] == expected["label"] == "Sneaker"
    got, want = confidences(answer), confidences(expected)
    assert [label for label, _ in got] == [label for label, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-6


def test_explain_tool_returns_the_map_as_an_image(app_url):
    async def calls(session):
        return await session.call_tool("explain", {"image": data_url(SHOE), "method": "relevance", "alpha": 1.0})

    result = mcp_session(app_url, calls)
    assert not result.isError, result.content
    (image,) = [c for c in result.content if c.type == "image"]
    assert image.mimeType == "image/png"
    heatmap = Image.open(io.BytesIO(base64.b64decode(image.data))).convert("RGB")
    assert heatmap.width == heatmap.height >= 28  # the square crop the model saw (enlarged for the 28x28 model)
    assert len(heatmap.getcolors(maxcolors=1 << 24)) > 10  # a map, not a blank


def test_faithfulness_and_attention_distance_tools_return_json(app_url):
    async def calls(session):
        faith = await session.call_tool("faithfulness", {"image": data_url(SHOE), "method": "rollout"})
        distance = await session.call_tool("attention_distance", {"image": data_url(SHOE)})
        return faith, distance

    faith, distance = mcp_session(app_url, calls)
    assert not faith.isError and not distance.isError, (faith.content, distance.content)
    scores = json.loads(faith.content[0].text)
    assert 0 <= scores["deletion_auc"] <= 1 and 0 <= scores["insertion_auc"] <= 1 and scores["target"] == "Sneaker"
    table = json.loads(distance.content[0].text)
    assert (table["layers"], table["heads"]) == (len(table["distance_px"]), len(table["distance_px"][0]))


def test_bad_inputs_get_the_pages_sentence(app_url):
    async def calls(session):
        return (
            await session.call_tool("classify", {"image": data_url(SHOE), "top_k": 99}),
            await session.call_tool("classify", {"image": "data:image/png;base64," + base64.b64encode(b"not a photo").decode()}),
            await session.call_tool("explain", {"image": data_url(SHOE), "method": "attention", "layer": 9}),
            await session.call_tool("classify", {"image": data_url(SHOE)}),  # and the next call is answered
        )

    top_k, unreadable, layer, after = mcp_session(app_url, calls)
    assert top_k.isError and top_k.content[0].text == "The top k must be from 1 to 20 for this model, not 99."
    assert unreadable.isError and unreadable.content[0].text == (
        "This file is not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo.")  # the upload's door
    assert layer.isError and layer.content[0].text == "The layer must be from 1 to 6 for this model, not 9."
    assert not after.isError and json.loads(after.content[0].text)["label"] == "Sneaker"
