"""The public endpoints as tools for agents: `python app.py --mcp` (or GRADIO_MCP_SERVER=True) serves them over
MCP under /gradio_api/mcp/, through Gradio's own MCP server.

A tool call is a call of the endpoint itself (Gradio's server submits it to the app's queue), so it meets the
same door for images, the same checks and limits as the page; the tool descriptions are the endpoint functions'
docstrings. The image goes in as a data URL, which Gradio's MCP server uploads into the app's cache first.

An upload the door refuses (not an image, too large, past the visitor's share) fails the tool call with the
door's own sentence, not httpx's report of the HTTP status.

Two things in Gradio 6.31's MCP server are set right here, for endpoints such as ours that also return a
gr.State for the page: a queued call's result comes back as one tuple of every output, which its State
filter cannot index (the call fails with "pop index out of range"), and a JSON result would be written as a
Python repr rather than JSON.
"""

from __future__ import annotations

import json

import httpx
from gradio.components import State
from gradio.mcp import GradioMCPServer

_pop_state = GradioMCPServer.pop_returned_state


def _results_without_state(components, data) -> list:
    """The tool's outputs without the State outputs, JSON values as JSON text."""
    if len(components) > 1 and len(data) == 1 and isinstance(data[0], (list, tuple)) and len(data[0]) == len(components):
        data = list(data[0])  # the queued path: one tuple of every output
    data = _pop_state(components, list(data))
    return [json.dumps(value) if isinstance(value, (dict, list)) and not _is_file(value) else value for value in data]


def _is_file(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("meta"), dict) and value["meta"].get("_type") == "gradio.FileData"


GradioMCPServer.pop_returned_state = staticmethod(_results_without_state)


def _door_sentence(execute):
    async def run(self, *args, **kwargs):
        try:
            return await execute(self, *args, **kwargs)
        except httpx.HTTPStatusError as e:  # the upload of the tool's image was refused: say why, as the page does
            raise RuntimeError(e.response.text) from None

    return run


GradioMCPServer._execute_tool_without_progress = _door_sentence(GradioMCPServer._execute_tool_without_progress)
GradioMCPServer._execute_tool_with_progress = _door_sentence(GradioMCPServer._execute_tool_with_progress)
