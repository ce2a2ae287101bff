"""orbax checkpoints of a training run: the last few (``<run>/checkpoints/last``) and the best by
validation top-1 (``<run>/checkpoints/best``).

A checkpoint holds the whole train state pytree (params, optimizer state, batch stats, bimask
state, step, RNG key) as arrays and a JSON ``meta`` dict with the data position (``epoch``,
``batch_in_epoch``: the next batch to read) and run bookkeeping, which is all :mod:`train.loop`
needs to continue exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Two orbax ``CheckpointManager``s under ``directory``: ``last`` keeps the ``keep`` most
    recent steps, ``best`` keeps one (saved only when the caller says the metric improved)."""

    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = os.path.abspath(directory)
        self.directory = directory
        self.last = ocp.CheckpointManager(
            os.path.join(directory, "last"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(directory, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )

    def latest_step(self) -> int | None:
        """Step of the most recent ``last`` checkpoint, or None."""
        return self.last.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, best: bool = False) -> None:
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON-able) at ``step`` in ``last`` (and
        in ``best`` when ``best``). Asynchronous; :meth:`wait` or :meth:`close` to finish."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.last.save(step, args=args, force=True)
        if best:
            # One save at a time: two managers saving the same step concurrently collide on
            # orbax's multi-host barrier names.
            self.last.wait_until_finished()
            args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta))
            self.best.save(step, args=args, force=True)

    def restore(self, state_like: Any, step: int | None = None, *, which: str = "last"):
        """(state, meta) of ``step`` (default: latest) of ``which`` ("last" or "best"), restored
        into the structure, shapes, dtypes and shardings of ``state_like``."""
        mngr = self.last if which == "last" else self.best
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {os.path.join(self.directory, which)!r} to resume from")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            state_like,
        )
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()
