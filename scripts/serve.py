"""Serve a model over OpenAI's HTTP API: `python scripts/serve.py [flags]` (see --help).

With no arguments it serves the embedded default model (SmolLM2-135M-Instruct) on
http://127.0.0.1:8000. Flags use vLLM's spelling; --config reads the same settings from a YAML file
(configs/serve/default.yaml). Stop it with Ctrl-C or SIGTERM: in-flight requests finish first
(up to --drain-timeout seconds). docs/serving.md lists the endpoints and error shapes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rtpjax.serving.api_server import main

if __name__ == "__main__":
    sys.exit(main())
