"""Fine-tune many LoRA / LoRA+ / DoRA adapters at once on one frozen base model.

    python scripts/finetune.py                                   # configs/finetune/demo.yaml
    python scripts/finetune.py --config configs/finetune/four_tasks.yaml
    python scripts/finetune.py --config X.yaml --output-dir runs/x --fresh
    python scripts/finetune.py --write-synthetic data/           # the synthetic tasks as JSONL

Running the same command again on the same output directory resumes from its last checkpoint
(after a crash or a kill) and ends with the same adapters as an uninterrupted run. Outputs:
<output_dir>/<task>/final (PEFT adapter), <task>/step-N (interval exports), metrics.jsonl,
loss.png, checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "finetune", "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help="fine-tuning YAML (default: %(default)s)"
    )
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the output directory's checkpoints and start over",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--write-synthetic",
        metavar="DIR",
        help="write every synthetic task as DIR/<task>.train.jsonl and .eval.jsonl, then exit",
    )
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("rtpjax").setLevel(args.log_level.upper())

    if args.write_synthetic:
        from rtpjax.finetune.tasks import TASKS, make_split, write_jsonl

        for name in TASKS:
            train, held = make_split(name, 2000, 200, seed=0)
            write_jsonl(train, os.path.join(args.write_synthetic, f"{name}.train.jsonl"))
            write_jsonl(held, os.path.join(args.write_synthetic, f"{name}.eval.jsonl"))
        print(f"wrote {len(TASKS)} tasks to {args.write_synthetic}")
        return 0

    from rtpjax.finetune.config import FinetuneConfig
    from rtpjax.finetune.trainer import Trainer

    try:
        cfg = FinetuneConfig.from_yaml(args.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=os.path.abspath(args.output_dir))
    if args.no_progress:
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, progress=False))
    out = os.path.abspath(cfg.output_dir)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    try:
        results = Trainer(cfg).run()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": out, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
