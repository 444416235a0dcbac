"""Model files are data: a crafted `.ckpt` or export is refused with a clear error, and its payload never runs.

Every payload would create a marker file if it ran (`builtins.open(marker, "w")` as a Hydra `_target_`, at the
top of a model part or nested silently in `criterion.matcher`; a pickled `__reduce__` calling
`pathlib.Path.touch`); `test_the_payloads_are_live` proves that they do when loaded naively. Each is refused by
the load path of predict.py / evaluate.py (`load_module`), by `init_from=`, by resuming (`ckpt_path=`, the
`DurableCheckpointIO` plugin) and by `SegmentationModule.load_from_checkpoint`, with the marker left
uncreated; the slow tests run the real entry points once each.
"""

from __future__ import annotations

import copy
import pathlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from densepred.engine.build import build_module
from densepred.engine.checkpoint_io import DurableCheckpointIO
from densepred.engine.loading import init_from, load_module
from densepred.engine.module import SegmentationModule
from densepred.engine.trust import allowed_targets, check_model_config, config_targets
from densepred.export_format import write_export

METADATA = SimpleNamespace(
    categories=[
        {"id": 1, "name": "thing", "isthing": 1, "color": [200, 0, 0]},
        {"id": 2, "name": "stuff", "isthing": 0, "color": [0, 0, 200]},
    ],
    num_classes=2,
    ignore_index=255,
)
# payload name -> (file kind, key path the error names)
PAYLOADS = {
    "export-part": ("export", "model.backbone._target_"),
    "export-criterion": ("export", "criterion.matcher._target_"),
    "ckpt-part": ("ckpt", "model.head._target_"),
    "ckpt-criterion": ("ckpt", "criterion.matcher._target_"),
    "ckpt-pickle": ("ckpt", None),
}
CKPT_PAYLOADS = [name for name, (kind, _) in PAYLOADS.items() if kind == "ckpt"]


class Touch:
    """Pickles as `pathlib.Path.touch(marker)`: runs on a plain (weights_only=False) unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def harmful(marker: Path) -> dict:
    """A Hydra node that truncates / creates `marker` when instantiated (not on hydra-core's blocklist)."""
    return {"_target_": "builtins.open", "_args_": [str(marker), "w"]}


@pytest.fixture(scope="module")
def tiny_model(tiny, tmp_path_factory):
    """A tiny SegmentationModule (2 classes) built from the shipped configs, and its settings."""
    cfg = tiny.compose_train(tiny.model_overrides(), tmp_path_factory.mktemp("tiny_model"))
    module = build_module(cfg, METADATA)
    settings = {k: v for k, v in dict(module.hparams).items() if k != "output_dir"}
    return SimpleNamespace(cfg=cfg, module=module, settings=settings)


def write_ckpt(path: Path, module: SegmentationModule, settings: dict, extra: dict | None = None) -> Path:
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": settings,
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.6.0",
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return path


def write_payload(name: str, folder: Path, tiny_model, marker: Path) -> Path:
    """The model file of payload `name` in `folder` (a `.ckpt`, or an export folder)."""
    kind, _ = PAYLOADS[name]
    settings = copy.deepcopy(tiny_model.settings)
    extra = None
    if name.endswith("-part"):
        settings["model"]["backbone" if kind == "export" else "head"] = harmful(marker)
    elif name.endswith("-criterion"):
        settings["criterion"]["matcher"] = harmful(marker)
    else:
        extra = {"callbacks": {"payload": Touch(marker)}}
    if kind == "export":
        return write_export(folder / name, settings, tiny_model.module.model.state_dict()).parent
    return write_ckpt(folder / f"{name}.ckpt", tiny_model.module, settings, extra)


def refused(name: str) -> str:
    """The pattern of the error payload `name` gets."""
    key = PAYLOADS[name][1]
    if key is None:
        return r"not a readable Lightning checkpoint \(UnpicklingError: Unsupported global.*weights_only=True"
    return "refused " + re.escape(key) + r"='builtins\.open'.*may only name this project's model parts"


@pytest.mark.parametrize("name", ["export-criterion", "ckpt-pickle"])
def test_the_payloads_are_live(tmp_path, tiny_model, name):
    """Loaded without the checks, the payloads do run (so the refusals below are meaningful)."""
    marker = tmp_path / "marker"
    path = write_payload(name, tmp_path, tiny_model, marker)
    if name == "ckpt-pickle":
        torch.load(path, weights_only=False)
    else:
        settings = OmegaConf.to_container(OmegaConf.load(path / "config.json"))
        instantiate(settings["criterion"], num_classes=2)  # hydra-core's blocklist lets it through, silently
    assert marker.exists()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_predict_and_evaluate_load_path_refuses(tmp_path, tiny_model, name):
    marker = tmp_path / "marker"
    path = write_payload(name, tmp_path, tiny_model, marker)
    with pytest.raises(ValueError, match=refused(name)) as error:
        load_module(path, task="panoptic", postprocess={})  # predict.py's call
    assert f"checkpoint={path}" in str(error.value)
    with pytest.raises(ValueError, match=refused(name)):
        load_module(path, metadata=dict(METADATA.__dict__), task="panoptic", output_dir=str(tmp_path))  # evaluate.py
    assert not marker.exists()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_init_from_refuses(tmp_path, tiny_model, name):
    marker = tmp_path / "marker"
    path = write_payload(name, tmp_path, tiny_model, marker)
    before = {k: v.clone() for k, v in tiny_model.module.state_dict().items()}
    with pytest.raises(ValueError, match=refused(name)) as error:
        init_from(tiny_model.module, path)
    assert f"init_from={path}" in str(error.value)
    assert not marker.exists()
    after = tiny_model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing copied


@pytest.mark.parametrize("name", CKPT_PAYLOADS)
def test_resume_and_load_from_checkpoint_refuse(tmp_path, tiny_model, name):
    """`ckpt_path=` reads through the trainer's CheckpointIO; Lightning's own classmethod is overridden too."""
    marker = tmp_path / "marker"
    path = write_payload(name, tmp_path, tiny_model, marker)
    with pytest.raises(ValueError, match=refused(name)) as error:
        DurableCheckpointIO().load_checkpoint(path)
    assert f"ckpt_path={path}" in str(error.value)
    with pytest.raises(ValueError, match=refused(name)):
        DurableCheckpointIO().load_checkpoint(path, weights_only=False)  # a request to unpickle is not honoured
    with pytest.raises(ValueError, match=refused(name)):
        SegmentationModule.load_from_checkpoint(path)
    assert not marker.exists()


def test_genuine_files_load_everywhere(tmp_path, tiny_model):
    """The allowlist lets every real model file through: a `.ckpt`, an export, through every loader."""
    module, settings = tiny_model.module, tiny_model.settings
    ckpt = write_ckpt(tmp_path / "model.ckpt", module, settings)
    export = write_export(tmp_path / "export", settings, module.model.state_dict()).parent
    for path in (ckpt, export):
        loaded = load_module(path, task="panoptic")
        assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
        assert init_from(loaded, path) == []
    assert DurableCheckpointIO().load_checkpoint(ckpt)["hyper_parameters"]["task"] == "panoptic"
    assert isinstance(SegmentationModule.load_from_checkpoint(ckpt), SegmentationModule)


def test_every_shipped_model_part_is_allowlisted(tiny):
    """Each `_target_` of configs/{backbone,neck,head,criterion} (and the converters') may be loaded back."""
    from densepred.convert import mask2former, maskformer

    targets = set()
    for group in ("backbone", "neck", "head", "criterion"):
        for file in sorted((tiny.ROOT / "configs" / group).glob("*.yaml")):
            targets |= config_targets(OmegaConf.load(file))
    targets |= {maskformer.NECK_TARGET, maskformer.HEAD_TARGET, mask2former.NECK_TARGET, mask2former.HEAD_TARGET}
    assert len(targets) >= 8 and targets <= allowed_targets(), sorted(targets - allowed_targets())
    assert {
        "densepred.heads.matcher.HungarianMatcher",
        "densepred.heads.postprocess.PostProcessor",
    } <= allowed_targets()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"model": {"head": {"_target_": "os.system", "_args_": ["true"]}}},
            r"refused model\.head\._target_='os\.system'",
        ),
        (
            {
                "criterion": {
                    "_target_": "densepred.heads.criterion.SetCriterion",
                    "_args_": [{"_target_": "posix.system"}],
                }
            },
            r"refused criterion\._args_\[0\]\._target_='posix\.system'",
        ),
        (
            {"model": {"neck": {"layers": [{"x": {"_target_": 42}}]}}},
            r"refused model\.neck\.layers\[0\]\.x\._target_=42",
        ),
        (
            {"criterion": {"_target_": "densepred.heads.criterion.SetCriterion", "_recursive_": False}},
            r"refused criterion\._recursive_=False: Hydra flags",
        ),
        ({"model": {"head": {"_partial_": True}}}, r"refused model\.head\._partial_"),
        (
            {"criterion": {"matcher": "${oc.decode:'{_target_: builtins.open}'}"}},
            r"refused criterion\.matcher=.*interpolation",
        ),
        ({"metadata": {"x": {"_target_": "${oc.env:PART}"}}}, r"refused metadata\.x\._target_=.*interpolation"),
        ([{"_target_": "builtins.open"}], r"not a mapping"),
    ],
)
def test_tricks_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        check_model_config(settings, source="checkpoint=crafted.ckpt")


def test_trusted_targets_extend_the_allowlist():
    settings = {"model": {"head": {"_target_": "my_project.MyHead"}}, "metadata": {"name": "${not instantiated}"}}
    with pytest.raises(ValueError, match=r"refused model\.head\._target_='my_project\.MyHead'.*trusted_targets"):
        check_model_config(settings, source="checkpoint=mine.ckpt")
    check_model_config(settings, source="checkpoint=mine.ckpt", trusted_targets={"my_project.MyHead"})


# ----------------------------------------------------------------------------------------- entry points (slow)


@pytest.mark.slow
def test_evaluate_command_line_refuses(tmp_path, tiny, tiny_model, synthetic_root):
    marker = tmp_path / "marker"
    path = write_payload("export-criterion", tmp_path, tiny_model, marker)
    result = tiny.run_script(
        [
            "evaluate.py",
            f"checkpoint={path}",
            *tiny.data_overrides(synthetic_root),
            "trainer.accelerator=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert result.returncode != 0
    assert "refused criterion.matcher._target_='builtins.open'" in result.stderr, result.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.slow
def test_predict_command_line_refuses(tmp_path, tiny, tiny_model):
    marker = tmp_path / "marker"
    path = write_payload("ckpt-pickle", tmp_path, tiny_model, marker)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (90, 120, 30)).save(images / "a.jpg")
    result = tiny.run_script(
        [
            "predict.py",
            f"checkpoint={path}",
            f"input={images}",
            f"output={tmp_path / 'out'}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert result.returncode != 0
    assert "not a readable Lightning checkpoint (UnpicklingError: Unsupported global" in result.stderr, result.stderr[
        -3000:
    ]
    assert not marker.exists() and not (tmp_path / "out" / "predictions.json").exists()


@pytest.fixture(scope="module")
def train_script(tiny):
    return tiny.load_script("train")


@pytest.mark.slow
@pytest.mark.parametrize(("option", "name"), [("ckpt_path", n) for n in CKPT_PAYLOADS] + [("init_from", "export-part")])
def test_train_refuses_to_resume_or_fine_tune_from(
    tmp_path, tiny, tiny_model, synthetic_root, train_script, option, name
):
    """train.py's main (composed config, in process): `ckpt_path=` reaches Lightning's resume, which loads
    through the DurableCheckpointIO; `init_from=` is read while the module is built."""
    marker = tmp_path / "marker"
    path = write_payload(name, tmp_path, tiny_model, marker)
    overrides = [
        *tiny.train_overrides(synthetic_root),
        "data.task=panoptic",
        "logger=none",
        "validate_before_fit=false",
        f"{option}={path}",
    ]
    cfg = tiny.compose_train(overrides, tmp_path / "run")
    with pytest.raises(ValueError, match=refused(name)) as error:
        train_script.main.__wrapped__(cfg)
    assert f"{option}={path}" in str(error.value)
    assert not marker.exists()
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))  # nothing trained
