"""Resumable training state: a checkpoint every epoch and early stopping that survives a restart.

Keras's ``EarlyStopping`` keeps its counters in memory, so a run killed and resumed would
start counting afresh and lose its best weights. Here the counters, the history and the best
weights live in ``RUN_DIR/checkpoints/`` and are written (temp + rename) at every epoch end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from lungedge.edge_runtime.atomic_write import atomic_write_text
from lungedge.edge_runtime.errors import ConfigError, WriteError, first_line

STATE = "state.json"
LAST_WEIGHTS = "last.weights.h5"
LAST_OPTIMIZER = "last_optimizer.npz"
BEST_WEIGHTS = "best.weights.h5"


class TrainState:
    """What has been done so far: completed phases, epochs in the current phase, history, early-stopping counters."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.phase: Optional[str] = None
        self.epoch = 0  # completed epochs in ``phase``
        self.done: List[str] = []
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[float] = None
        self.wait = 0
        self.stopped = False
        self.seconds = 0.0

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        s = cls(folder)
        p = Path(folder) / STATE
        if p.is_file():
            try:
                d = json.loads(p.read_text())
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"damaged checkpoint state {str(p)!r} ({first_line(exc)}); delete the "
                                  f"{str(folder)!r} folder to restart the run, or train into a new folder") from None
            for k in ("phase", "epoch", "done", "history", "best", "wait", "stopped", "seconds"):
                setattr(s, k, d.get(k, getattr(s, k)))
        return s

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(self.folder / STATE), json.dumps({
            "phase": self.phase, "epoch": self.epoch, "done": self.done, "history": self.history,
            "best": self.best, "wait": self.wait, "stopped": self.stopped, "seconds": self.seconds}, indent=1))

    def start_phase(self, name: str) -> int:
        """Begin (or continue) phase ``name``; returns the epochs already completed in it.

        Each phase early-stops on its own: a new phase starts without a best value, so its best
        epoch is kept even when an earlier phase scored better on the monitored value (fine-tuning
        with augmentation has a higher in-folder validation loss than the head trained on cached
        features, yet generalises better; measured on the external dev set, train/SELECTION.md)."""
        if self.phase != name:
            self.phase, self.epoch, self.wait, self.stopped, self.best = name, 0, 0, False, None
            self.save()
        return self.epoch

    def finish_phase(self) -> None:
        if self.phase and self.phase not in self.done:
            self.done.append(self.phase)
        self.save()

    def path(self, name: str) -> Path:
        return self.folder / name


def _atomic(path: Path, tmp: Path, write, nbytes: int) -> None:
    """``write(tmp)`` then rename onto ``path``; on any failure (a full disk) no partial file is left
    and the error is one line naming the file.

    The free space is checked first: h5py (under Keras's ``save_weights``) crashes the process with
    a segmentation fault when it closes a file on a full disk, so it must not be reached then.

    Raises:
        WriteError: not enough free space for ``nbytes`` (plus 10 % and 1 MiB), or the write failed.
    """
    import shutil

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError as exc:
        raise WriteError(f"cannot write checkpoint {str(path)!r}: {first_line(exc)}") from None
    need = int(nbytes * 1.1) + (1 << 20)
    if free < need:
        raise WriteError(f"cannot write checkpoint {str(path)!r}: the disk is full ({free:,} bytes free, "
                         f"about {need:,} needed)")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as exc:  # h5py raises OSError or RuntimeError on ENOSPC
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteError(f"cannot write checkpoint {str(path)!r}: {first_line(exc)}") from None


def save_weights_atomic(model, path: Path) -> None:
    """The model's weights to ``path`` (``.weights.h5``), written whole or not at all."""
    tmp = path.with_name(f"{path.name[:-len('.weights.h5')]}-tmp{os.getpid()}.weights.h5")
    _atomic(path, tmp, lambda t: model.save_weights(str(t)), _nbytes(model.weights))


def save_optimizer(optimizer, path: Path) -> None:
    """The optimizer's variables to ``path`` (``.npz``), written whole or not at all."""
    arrays = {f"v{i:04d}": np.asarray(v.numpy() if hasattr(v, "numpy") else v) for i, v in enumerate(optimizer.variables)}
    tmp = path.with_name(f"{path.stem}-tmp{os.getpid()}.npz")
    _atomic(path, tmp, lambda t: np.savez(t, **arrays), sum(a.nbytes for a in arrays.values()))


def _nbytes(variables) -> int:
    return int(sum(np.prod(v.shape) * np.dtype(getattr(v.dtype, "name", v.dtype)).itemsize for v in variables))


def load_optimizer(optimizer, trainable_variables, path: Path) -> bool:
    """Restore optimizer variables saved by ``save_optimizer``; False if they do not fit."""
    if not path.is_file():
        return False
    if not optimizer.built:
        optimizer.build(trainable_variables)
    data = np.load(path)
    values = [data[k] for k in sorted(data.files)]
    if len(values) != len(optimizer.variables) or any(tuple(v.shape) != tuple(a.shape) for v, a in zip(optimizer.variables, values)):
        return False
    for v, a in zip(optimizer.variables, values):
        v.assign(a)
    return True


def make_callback(state: TrainState, full_model, monitor: str, patience: int, phase_offset: int):
    """A Keras callback that, at every epoch end, records history, updates the restartable early
    stopping and writes the last weights, the optimizer state and (when improved) the best weights."""
    import keras

    higher_better = "accuracy" in monitor or "auc" in monitor

    class _Checkpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            seconds = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
            lr = self.model.optimizer.learning_rate
            row = {"epoch": phase_offset + epoch + 1, "phase": state.phase,
                   "learning_rate": float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr)),
                   "seconds": round(seconds, 3)}
            row.update({k: float(v) for k, v in logs.items() if k in ("loss", "accuracy", "val_loss", "val_accuracy")})
            value = logs.get(monitor)
            if value is not None:
                value = float(value)
                improved = state.best is None or (value > state.best if higher_better else value < state.best)
                if improved:
                    state.best, state.wait = value, 0
                    save_weights_atomic(full_model, state.path(BEST_WEIGHTS))
                else:
                    state.wait += 1
                    if patience and state.wait >= patience:
                        self.model.stop_training = True
                        state.stopped = True
                        logging.getLogger(__name__).info(
                            f"early stopping: {monitor} has not improved for {patience} epochs (best {state.best:.4f})")
            save_weights_atomic(self.model, state.path(LAST_WEIGHTS))
            save_optimizer(self.model.optimizer, state.path(LAST_OPTIMIZER))
            state.history.append(row)
            state.epoch = epoch + 1
            state.seconds += seconds
            state.save()

    return _Checkpoint()
