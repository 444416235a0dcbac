"""Durable checkpoints (`DurableCheckpointIO`): a writer SIGKILLed at random never leaves a truncated `last.ckpt`,
the temp files a kill leaves are gone after the next writer's first save, `$TMPDIR` (another filesystem where
the machine has one) is never written, files follow the umask, and train.py's Trainer uses the plugin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from densepred.engine.build import build_trainer
from densepred.engine.checkpoint_io import DurableCheckpointIO, remove_stale_temp_files

# Run as one subprocess: imports torch and the plugin once (Lightning's import alone takes seconds), then forks a
# fresh writer per iteration (single-threaded torch: fork-safe), SIGKILLs it at a random moment of its save loop
# and checks last.ckpt. A writer reports its first save (which clears the previous writer's temp files) on a pipe.
KILL_LOOP = r"""
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)
from densepred.engine.checkpoint_io import DurableCheckpointIO

folder, iterations, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
path = os.path.join(folder, "last.ckpt")
size = 1 << 20  # 4 MB of float32
rng = random.Random(seed)


def write_forever(pipe):
    checkpoint_io, step = DurableCheckpointIO(), 0
    while True:
        w = torch.full((size,), float(step))
        checkpoint_io.save_checkpoint({"step": step, "state_dict": {"w": w}, "hyper_parameters": {}}, path)
        if step == 0:
            os.write(pipe, b"1")
        step += 1


def check():
    if not os.path.exists(path):
        return "absent"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    w = checkpoint["state_dict"]["w"]
    assert w.shape == (size,) and bool((w == float(checkpoint["step"])).all()), "mixed or short tensor"
    return "complete"


def temp_files():
    return {os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tmp")}


results = {"absent": 0, "complete": 0, "kills_leaving_temp_files": 0, "survivors": [], "errors": []}
left = set()
for _ in range(iterations):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            write_forever(write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    if os.read(read_end, 1) != b"1":
        results["errors"].append("the writer died before its first save")
    results["survivors"] += sorted(p for p in left if os.path.exists(p))  # left by the previous kill
    time.sleep(rng.uniform(0.0, 0.12))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_end)
    try:
        results[check()] += 1
    except Exception as error:
        results["errors"].append(repr(error))
    left = temp_files()
    results["kills_leaving_temp_files"] += bool(left)
print(json.dumps(results))
"""


def other_filesystem_tmpdir(tmp_path: Path) -> Path | None:
    """A fresh folder in /dev/shm when that is another filesystem than `tmp_path`'s (else None)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        return None
    folder = shm / f"densepred-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    return folder


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    tmpdir = other_filesystem_tmpdir(tmp_path)
    if tmpdir is None:
        warnings.warn(
            "no second filesystem for $TMPDIR (/dev/shm missing or on the same device): not tested", stacklevel=1
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    try:
        result = subprocess.run(
            [sys.executable, "-c", KILL_LOOP, str(folder), "15", "0"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        if tmpdir is not None:
            assert [p for p in tmpdir.rglob("*") if p.is_file()] == []  # nothing was staged in $TMPDIR
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    assert outcome["errors"] == [] and outcome["absent"] + outcome["complete"] == 15, outcome
    assert outcome["kills_leaving_temp_files"] >= 1, outcome  # the kills did land inside saves
    assert outcome["survivors"] == [], outcome  # each next writer's first save removed them

    # The next start: whatever the last kill left goes with the first save, other temp files stay.
    foreign = folder / ".config.json.abcd1234.tmp"
    foreign.write_bytes(b"not a checkpoint's")
    DurableCheckpointIO().save_checkpoint({"step": -1, "state_dict": {}}, folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == [".config.json.abcd1234.tmp", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["step"] == -1


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        DurableCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temp_files_are_recognised(tmp_path):
    stale = [tmp_path / ".last.ckpt.k2j_x9a1.tmp", tmp_path / ".best-12.ckpt.0a1b2c3d.tmp"]
    kept = [tmp_path / ".model.safetensors.0a1b2c3d.tmp", tmp_path / "last.ckpt", tmp_path / "notes.tmp"]
    for file in stale + kept:
        file.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_train_py_trainer_uses_the_plugin(tmp_path, tiny, synthetic_root):
    """build_trainer wires DurableCheckpointIO (trusting the config's own model parts) and clears the checkpoint
    folder's stale temp files; a CheckpointIO in `trainer.plugins` replaces it."""
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".last.ckpt.abcdefgh.tmp"
    stale.write_bytes(b"half a checkpoint")
    cfg = tiny.compose_train([*tiny.train_overrides(synthetic_root), "logger=none"], tmp_path)
    checkpoint_io = build_trainer(cfg).strategy.checkpoint_io
    assert isinstance(checkpoint_io, DurableCheckpointIO)
    assert cfg.head._target_ in checkpoint_io.trusted_targets
    assert not stale.exists()

    plugin = "+trainer.plugins=[{_target_:lightning.pytorch.plugins.io.TorchCheckpointIO}]"
    cfg = tiny.compose_train([*tiny.train_overrides(synthetic_root), "logger=none", plugin], tmp_path)
    checkpoint_io = build_trainer(cfg).strategy.checkpoint_io
    assert type(checkpoint_io).__name__ == "TorchCheckpointIO"
