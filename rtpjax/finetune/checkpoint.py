"""Orbax checkpoints of a fine-tuning run: the device state (adapter bank, every optimizer state,
accumulated gradients) and the host state (dispatcher, each task's step and data position, where
the metrics log stood) in one step directory, written atomically by Orbax's CheckpointManager.

The device state is saved as its flat list of leaves: the tree structure (optax NamedTuples and
all) is rebuilt from the run's config, which must be the same to resume (a fingerprint of it is
stored and checked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger("rtpjax.finetune")


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able description of the run (its config)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunCheckpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, host: dict) -> None:
        leaves = jax.tree.leaves(state)
        arrays = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), host=ocp.args.JsonSave(host)
            ),
        )
        self._manager.wait_until_finished()
        logger.info("checkpoint %d saved to %s", step, self.directory)

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """(state shaped like `like`, host dict) of checkpoint `step`."""
        leaves, treedef = jax.tree.flatten(like)
        abstract = {
            f"leaf_{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype) for i, x in enumerate(leaves)
        }
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{self.directory}/{step}: checkpoint does not match this run's "
                f"adapter layout ({' '.join(str(e).split())[:200]})"
            ) from None
        arrays = out["state"]
        if len(arrays) != len(leaves):
            raise ValueError(
                f"{self.directory}/{step}: checkpoint has {len(arrays)} arrays, this "
                f"run's state {len(leaves)}: it was written by a different config"
            )
        restored = []
        for i, x in enumerate(leaves):
            a = arrays[f"leaf_{i:05d}"]
            if tuple(a.shape) != tuple(x.shape) or np.dtype(a.dtype) != np.dtype(x.dtype):
                raise ValueError(
                    f"{self.directory}/{step}: array {i} is {a.dtype}{list(a.shape)}, "
                    f"this run expects {x.dtype}{list(x.shape)}"
                )
            restored.append(a)
        return jax.tree.unflatten(treedef, restored), out["host"]

    def close(self) -> None:
        self._manager.close()
