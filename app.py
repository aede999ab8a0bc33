"""vit-demo: a Vision Transformer in the browser. `python app.py [--share] [--host HOST] [--port PORT] [--mcp]`.

Runs as it is on a Hugging Face Space. Environment: VIT_DEMO_MODEL (default model), VIT_DEMO_MODELS
(comma-separated list offered), VIT_DEMO_ALLOW_ANY_MODEL=1 (visitors may type any Hub id),
GRADIO_MCP_SERVER=True (what --mcp does: the endpoints are also MCP tools, under /gradio_api/mcp/).
"""

import argparse
import logging

from vit_demo.ui import LAUNCH_KWARGS, build_demo

# The app's own lines (which model serves and why, one per refused request) at INFO; other libraries' warnings.
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("vit_demo").setLevel(logging.INFO)

demo = build_demo()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the vit-demo page.")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--mcp", action="store_true",
                        help="also serve the endpoints as MCP tools for agents, under /gradio_api/mcp/ (default: GRADIO_MCP_SERVER)")
    args = parser.parse_args()
    demo.launch(share=args.share or None, server_name=args.host, server_port=args.port, mcp_server=args.mcp or None,
                **LAUNCH_KWARGS)
