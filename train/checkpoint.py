"""orbax checkpoints of a training run: the last few (``<run>/checkpoints/last``) and the best by
validation top-1 (``<run>/checkpoints/best``).

A checkpoint holds the whole train state pytree (params, optimizer state, batch stats, bimask
state, step, RNG key) as arrays and a JSON ``meta`` dict with the data position (``epoch``,
``batch_in_epoch``: the next batch to read), run bookkeeping and a SHA-256 of every array
(``checksums``, keyed by the array's path), which is all :mod:`train.loop` needs to continue
exactly.

:meth:`Checkpointer.restore` verifies a checkpoint before handing it out: every JSON metadata
file parses (an empty or garbled one is named), the arrays fit the structure and shapes of the
running model (a mismatch names the array and both shapes), and every restored array hashes to the
checksum stored when it was saved. A checkpoint that fails (other than by not fitting the model)
is moved to ``checkpoints/corrupt/`` and the next older one is tried, with a warning; when none
verifies the restore stops with every reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# orbax's JSON files inside a step directory (``array_metadatas/process_<i>`` as well).
_JSON_FILES = ("_CHECKPOINT_METADATA", "metadata", "_METADATA", "_sharding")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the checkpoint and what is wrong."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files or arrays do not verify (another one may still be good)."""


def _local(x) -> np.ndarray:
    """Host copy of one array of the (replicated) state: the first local shard, so that every
    process can hash it without gathering."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))


def checksums(state: Any) -> dict[str, str]:
    """``{array path: sha256 of dtype, shape and bytes}`` of every leaf of ``state``."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = np.ascontiguousarray(_local(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def _path(path) -> str:
    """``a/b/0`` for a pytree key path (orbax's naming of the same leaf)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


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
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON-able; the arrays' checksums are
        added) at ``step`` in ``last`` (and in ``best`` when ``best``). Asynchronous;
        :meth:`wait` or :meth:`close` to finish."""
        meta = {**meta, "checksums": checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.last.save(step, args=args, force=True)
        if best:
            # One save at a time: two managers saving the same step concurrently collide on
            # orbax's multi-host barrier names.
            self.last.wait_until_finished()
            args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta))
            self.best.save(step, args=args, force=True)

    def _manager(self, which: str):
        if which not in ("last", "best"):
            raise ValueError(f"which must be 'last' or 'best', got {which!r}")
        return self.last if which == "last" else self.best

    def step_dir(self, step: int, which: str = "last") -> str:
        return os.path.join(self.directory, which, str(step))

    def read_meta(self, step: int, which: str = "last") -> dict:
        """The JSON ``meta`` of one checkpoint, after checking that each of its JSON metadata
        files parses (:class:`CorruptCheckpoint` naming the file otherwise)."""
        root = self.step_dir(step, which)
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name in _JSON_FILES or os.path.basename(dirpath) == "array_metadatas":
                    path = os.path.join(dirpath, name)
                    try:
                        with open(path) as f:
                            json.load(f)
                    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                        size = os.path.getsize(path) if os.path.exists(path) else 0
                        raise CorruptCheckpoint(
                            f"checkpoint {step} ({root}): metadata file {path} is unreadable "
                            f"({'empty file' if size == 0 else e})") from None
        try:
            out = self._manager(which).restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises many types; name the checkpoint
            raise CorruptCheckpoint(f"checkpoint {step} ({root}): meta unreadable: {e}") from e
        return dict(out["meta"])

    def _check_fits(self, step: int, which: str, state_like: Any) -> None:
        """CheckpointError naming the first array whose path or shape differs from the model's."""
        root = self.step_dir(step, which)
        meta_file = os.path.join(root, "state", "_METADATA")
        try:
            with open(meta_file) as f:
                tree = json.load(f)["tree_metadata"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"checkpoint {step} ({root}): {meta_file} unreadable: "
                                    f"{e!r}") from None
        del tree  # parsed above to name a damaged file; the shapes below are the global ones
        try:  # ("write_shape" in _METADATA is one shard's shape for a sharded array)
            tree = ocp.StandardCheckpointHandler().metadata(epath.Path(root, "state")).tree
        except Exception as e:  # noqa: BLE001 - orbax raises many types; name the checkpoint
            raise CorruptCheckpoint(f"checkpoint {step} ({root}): array metadata unreadable: "
                                    f"{e!r}") from None
        have = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
        want = {_path(p): tuple(np.shape(x))
                for p, x in jax.tree_util.tree_leaves_with_path(state_like)}
        wrong = []
        for path in sorted(set(have) | set(want), key=lambda p: (not p.startswith("params"), p)):
            if path not in have or path not in want:
                where = "this model only" if path not in have else "the checkpoint only"
                wrong.append(f"array {path} is in {where}")
            elif have[path] != want[path]:
                wrong.append(f"array {path} has shape {have[path]} in the checkpoint, "
                             f"{want[path]} here")
        if wrong:
            more = f" (and {len(wrong) - 1} more arrays)" if len(wrong) > 1 else ""
            raise CheckpointError(f"checkpoint {step} ({root}) does not fit this model: "
                                  f"{wrong[0]}{more}; different --arch, --width-mult or N:M?")

    def _restore_one(self, step: int, which: str, state_like: Any):
        meta = self.read_meta(step, which)
        self._check_fits(step, which, state_like)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            state_like,
        )
        root = self.step_dir(step, which)
        try:
            out = self._manager(which).restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"checkpoint {step} ({root}): arrays unreadable: {e}") from e
        state = out["state"]
        stored = meta.get("checksums")
        if stored is None:
            warnings.warn(f"checkpoint {step} ({root}) has no checksums (saved by an older "
                          "version): not verified", stacklevel=3)
        else:
            for path, digest in checksums(state).items():
                if stored.get(path) != digest:
                    raise CorruptCheckpoint(
                        f"checkpoint {step} ({root}): array {path} does not match the checksum "
                        "stored when it was saved (the file is damaged)")
        return state, meta

    def restore(self, state_like: Any, step: int | None = None, *, which: str = "last",
                fallback: bool = True, report=print):
        """(state, meta) of ``step`` (default: the newest that verifies) of ``which``, restored
        into the structure, shapes, dtypes and shardings of ``state_like``. ``meta["restored_from"]``
        is the step used and ``meta["skipped_corrupt"]`` lists the damaged checkpoints passed over
        (each also moved to ``checkpoints/corrupt/`` and reported through ``report``).

        Raises :class:`CheckpointError` when the checkpoint does not fit ``state_like`` and
        :class:`CorruptCheckpoint` when no checkpoint verifies (or ``step``'s does not)."""
        mngr = self._manager(which)
        steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise ValueError(f"no checkpoint in {os.path.join(self.directory, which)!r} to resume from")
        failures = []
        for s in steps:
            try:
                state, meta = self._restore_one(s, which, state_like)
            except CorruptCheckpoint as e:
                failures.append(str(e))
                if not fallback or step is not None:
                    raise
                report(f"WARNING: {e}; moved to {self._quarantine(s, which)}; trying the previous "
                       "checkpoint")
                continue
            if failures:
                report(f"WARNING: resuming from checkpoint {s}, the newest that verifies")
            return state, {**meta, "restored_from": s, "skipped_corrupt": failures}
        raise CorruptCheckpoint("no checkpoint verifies:\n  " + "\n  ".join(failures))

    def _quarantine(self, step: int, which: str) -> str:
        """Move a damaged checkpoint out of orbax's view (kept for inspection); process 0 moves."""
        dest = os.path.join(self.directory, "corrupt", f"{which}-{step}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.exists(dest):
                shutil.rmtree(dest)
            shutil.move(self.step_dir(step, which), dest)
        self._manager(which).reload()
        return dest

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()
