"""The Gradio page, one module per concern.

- `page.py`: assembles the Blocks (header, photo, model choice, tabs) and starts the registry.
- `classify.py`, `attention.py`: one tab each, building their components and wiring their events.
- `faith.py`, `maps.py`: the Attention tab's faithfulness score, `/faithfulness` and the comparison of methods;
  the checks every map request passes (method, options, class to explain).
- `guard.py`: the one door every image passes (where it came from, how big it decodes) and the result images.
- `checks.py`: every other input, checked against the chosen model; refusals in one sentence, logged in one line.
- `server.py`: limits on raw HTTP requests and the lifetime of cached files.
- `tools.py`: the public endpoints as MCP tools for agents.
"""

import gradio.component_meta as _component_meta

# Gradio writes a typing stub (.pyi) beside every module that subclasses one of its components, at import: this
# package's source tree stays as it was installed. The stubs only serve Gradio's own editor hints.
_component_meta.create_or_modify_pyi = lambda component_class, class_name, events: None

from . import tools  # noqa: E402, F401 - sets Gradio's MCP server right for endpoints that also return a State
from .page import LAUNCH_KWARGS, build_demo, start_registry  # noqa: E402

__all__ = ["LAUNCH_KWARGS", "build_demo", "start_registry"]
