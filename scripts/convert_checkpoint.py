"""Convert between checkpoint formats, the tokenizer files carried along.

    python scripts/convert_checkpoint.py                          # the embedded SmolLM2 GGUF → HF
    python scripts/convert_checkpoint.py MODEL_DIR OUT --to orbax # HF safetensors → Orbax (OCDBT)
    python scripts/convert_checkpoint.py ORBAX_DIR OUT --to hf    # Orbax → HF safetensors
    python scripts/convert_checkpoint.py model.gguf OUT --to hf   # GGUF → HF safetensors (float32)

Without --dtype every tensor keeps its values and dtype exactly, so HF → Orbax → HF gives back the
same tensors bit for bit, and GGUF → HF gives the GGUF's float32 dequantisation. The output is
written beside OUT and renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rtpjax.env import DEFAULT_MODEL_NAME, default_model_path
from rtpjax.weights.checkpoint import CONVERT_DTYPES, FORMATS, convert_checkpoint


def parse_size(text: str) -> int:
    """'5GB', '500MB', '123' → bytes (decimal units, as HF's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-shard-size={text!r}: expected e.g. 5GB") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "src",
        nargs="?",
        help="HF directory, .gguf file or rtpjax Orbax directory "
        "(default: the embedded SmolLM2-135M-Instruct GGUF)",
    )
    ap.add_argument("dst", nargs="?", help="output directory (default: out/<name>-<format>)")
    ap.add_argument("--to", choices=FORMATS, default="hf")
    ap.add_argument(
        "--dtype",
        choices=CONVERT_DTYPES,
        default=None,
        help="store tensors in this dtype (default: keep each tensor's own)",
    )
    ap.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=5 * 10**9,
        help="HF output: largest safetensors file (default 5GB)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    src = args.src or default_model_path()
    name = DEFAULT_MODEL_NAME if args.src is None else os.path.basename(src.rstrip("/"))
    name = name.removesuffix(".gguf")
    dst = args.dst or os.path.join("out", f"{name}-{args.to}")
    t = time.perf_counter()
    try:
        convert_checkpoint(
            src,
            dst,
            args.to,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.quiet,
            max_shard_bytes=args.max_shard_size,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    print(f"wrote {dst} ({args.to}, {size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
