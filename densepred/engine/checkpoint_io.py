"""Durable, trusted Lightning checkpoints: the `CheckpointIO` plugin every train.py Trainer uses.

Lightning's own `TorchCheckpointIO` serialises to memory, writes through an fsspec transaction into a temp
file in `$TMPDIR` and moves it onto the name: across filesystems that move is a copy, so a SIGKILL during
it leaves a truncated `last.ckpt`; a crash leaves checkpoint-sized temp files; files come out 0600. This
plugin instead:

- saves through `densepred.utils.io.atomic_write`: `torch.save` into a temp file *beside* the checkpoint
  (`.<name>.<random>.tmp`), fsync, `os.replace` onto the name (atomic, same folder), mode 0666 less the
  umask. A reader sees the previous checkpoint or the new one, never a part of one;
- removes the temp files a killed writer left (`.<name>.ckpt.<random>.tmp`) from a checkpoint folder before
  its first save there, and from the ModelCheckpoint folders when `build_trainer` builds the Trainer;
- loads with `torch.load(weights_only=True)` whatever the caller asks (resume `ckpt_path=`, the test of the
  best checkpoint), and refuses a checkpoint whose `hyper_parameters` name anything but allowlisted model
  parts (`densepred.engine.trust`; `trusted_targets` adds the training config's own).

Remote paths (`s3://...`) are left to Lightning's writer; their loads are weights-only and checked too.
One run writes into a checkpoint folder at a time (a second run's live temp files would be taken as stale).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from densepred.engine.trust import check_model_config, load_checkpoint_file
from densepred.utils.io import atomic_write

log = logging.getLogger(__name__)

# `atomic_write`'s temp names (mkstemp: prefix `.<name>.`, suffix `.tmp`) for checkpoint files.
STALE_TEMP = re.compile(r"^\.(?P<name>.+\.ckpt)\.[^.]+\.tmp$")


def is_remote(path: Any) -> bool:
    return "://" in str(path)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the checkpoint temp files (`.<name>.ckpt.<random>.tmp`) in `folder` a killed writer left;
    returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in folder.glob(".*.tmp"):
        if STALE_TEMP.match(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    if removed:
        log.info(f"removed {len(removed)} checkpoint temp file(s) left by an interrupted save in {folder}")
    return removed


class DurableCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced, umask-mode checkpoint saves in the destination folder; weights-only, allowlist-checked
    loads. `trusted_targets`: `_target_`s trusted beyond the allowlist (the training config's model parts)."""

    def __init__(self, trusted_targets: Iterable[str] = ()) -> None:
        super().__init__()
        self.trusted_targets = frozenset(trusted_targets)
        self._cleaned: set[Path] = set()

    def clean(self, folder: str | Path) -> list[Path]:
        """Remove the stale checkpoint temp files of `folder`, once per folder and plugin."""
        folder = Path(folder).resolve()
        if folder in self._cleaned:
            return []
        self._cleaned.add(folder)
        return remove_stale_temp_files(folder)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options})")
        if is_remote(path):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        self.clean(path.parent)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at `path`, read with `weights_only=True` (a `weights_only=False` request is not
        honoured: checkpoints are data), its hyper-parameters checked against the allowlist."""
        source = f"ckpt_path={path}"
        map_location = map_location or (lambda storage, loc: storage)
        if is_remote(path):
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
            if not isinstance(checkpoint, dict):
                raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
            checkpoint = load_checkpoint_file(path, source=source, map_location=map_location)
        check_model_config(checkpoint.get("hyper_parameters", {}), source=source, trusted_targets=self.trusted_targets)
        return checkpoint
