"""The OpenAI-compatible server: `python scripts/serve.py`, or build the app yourself:

from rtpjax.serving import ServerArgs, build_app, run_server
"""

from rtpjax.serving.api_server import ServerArgs, build_app, main, parse_args, run_server

__all__ = ["ServerArgs", "build_app", "main", "parse_args", "run_server"]
