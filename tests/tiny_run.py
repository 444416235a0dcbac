"""Tiny train.py / evaluate.py overrides shared by the end-to-end tests (not a test module).

Four 64-96 px synthetic training images at batch 2 make one epoch of 2 steps, so `trainer.max_steps=2`
runs one validation; narrow, shallow necks and heads keep every run to a few seconds on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import densepred.engine.build  # noqa: F401  (registers the `main_metric` resolver used by configs/train.yaml)

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("mask2former", "maskformer", "mask2former_small")
# A native backbone, and timm's resnet18 through the timm_resnet50 config.
BACKBONES = {
    "resnet18": ["backbone=resnet18"],
    "timm_resnet18": ["backbone=timm_resnet50", "backbone.model_name=resnet18"],
}


def data_overrides(data_root: str | Path, task: str = "panoptic") -> list[str]:
    """The tiny synthetic data set (4 train / 4 val images) in `data_root`, loaded in the main process."""
    return [
        f"data.root={data_root}",
        f"data.task={task}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=4",
        "data.synthetic.min_size=64",
        "data.synthetic.max_size=96",
        "data.train_transform.size=64",
        "data.eval_transform.short=64",
        "data.eval_transform.max_size=96",
        "data.batch_size=2",
        "data.num_workers=0",
    ]


def model_overrides(head: str = "mask2former_small", backbone: str = "resnet18") -> list[str]:
    """A narrow `head` (with the neck and criterion it brings) on a randomly initialised `backbone`."""
    overrides = [
        f"head={head}",
        *BACKBONES[backbone],
        "backbone.pretrained=null",
        "head.hidden_dim=32",
        "head.num_queries=6",
        "head.num_heads=4",
        "head.dim_feedforward=64",
        "head.num_layers=2",
        "neck.conv_dim=32",
        "neck.mask_dim=32",
    ]
    if head != "maskformer":  # the deformable pixel decoder and the point-sampled losses
        overrides += ["neck.encoder_layers=1", "neck.num_heads=4", "neck.dim_feedforward=64", "criterion.num_points=256"]
    return overrides


def train_overrides(
    data_root: str | Path, head: str = "mask2former_small", backbone: str = "resnet18", max_steps: int = 2
) -> list[str]:
    """Data + model + a `max_steps` CPU run that logs every step."""
    return [
        *data_overrides(data_root),
        *model_overrides(head, backbone),
        "trainer.accelerator=cpu",
        f"trainer.max_steps={max_steps}",
        "trainer.log_every_n_steps=1",
    ]


def compose_train(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """configs/train.yaml with `overrides`; `paths.output_dir` replaces `${hydra:...}` (absent in compose)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def load_script(name: str) -> ModuleType:
    """An entry-point script (train.py, evaluate.py, predict.py) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"densepred_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`python <args>` in the repository root (the real command-line path), output captured."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(path: Path) -> dict[str, float | None]:
    return json.loads(path.read_text())
