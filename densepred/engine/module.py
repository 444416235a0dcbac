"""SegmentationModule: the LightningModule that trains and evaluates a Segmenter."""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning import LightningModule

from densepred.data.base import TASKS
from densepred.engine.optim import build_adamw
from densepred.engine.schedules import build_scheduler
from densepred.engine.trust import check_model_config, load_checkpoint_file
from densepred.evaluation.build import EVALUATIONS, build_evaluators
from densepred.heads.box_criterion import BoxCriterion
from densepred.heads.box_ops import normalized_targets
from densepred.segmenter import Segmenter
from densepred.utils.checkpointing import enable_activation_checkpointing
from densepred.utils.io import atomic_write_json

log = logging.getLogger(__name__)

# `activation_checkpointing`: the parts whose repeated blocks (backbone stages, encoder layers, decoder
# layers) can be checkpointed; `compile`: what torch.compile compiles.
CHECKPOINTABLE = ("backbone", "neck", "head")
COMPILE_CHOICES = (False, True, "backbone")
# Post-processing settings of masks only (configs/postprocess/default.yaml), not given to a box detector's.
MASK_POSTPROCESS_KEYS = ("object_mask_threshold", "overlap_threshold", "exact_max_pixels")


class SegmentationModule(LightningModule):
    """Backbone + neck + head trained with a set criterion, evaluated with COCO / panoptic / mIoU metrics.

    Every argument is a plain dict (Hydra config converted to containers) and is stored in the checkpoint,
    so `SegmentationModule.load_from_checkpoint(path)` rebuilds the model with no config at hand (the file
    read with `torch.load(weights_only=True)`, its hyper-parameters checked by `densepred.engine.trust`).
    The constructor itself trusts its arguments: they come from the user's own config.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        criterion: Mapping[str, Any],
        metadata: Mapping[str, Any],
        task: str = "panoptic",
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        evaluations: Sequence[str] | None = None,
        compile: bool | str = False,
        channels_last: bool | None = None,
        activation_checkpointing: Sequence[str] = (),
        recompute_norm_outputs: bool = True,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"data.task={task!r} is not a task; choose one of {TASKS}")
        self.save_hyperparameters()
        self.task = task
        self.metadata = dict(metadata)
        num_classes = int(self.metadata["num_classes"])
        self.model = Segmenter.from_config(
            {
                **model,
                "num_classes": num_classes,
                "channels_last": channels_last,
                "recompute_norm_outputs": recompute_norm_outputs,
            }
        )
        for part in activation_checkpointing:
            if part not in CHECKPOINTABLE or not hasattr(getattr(self.model, part), "repeated_blocks"):
                raise ValueError(
                    f"activation_checkpointing={list(activation_checkpointing)}: {part!r} is not a part with "
                    f"repeated blocks; choose from {list(CHECKPOINTABLE)} (a neck without an encoder has none)"
                )
            enable_activation_checkpointing(getattr(self.model, part).repeated_blocks())
        if compile not in COMPILE_CHOICES:
            raise ValueError(f"compile={compile!r}: choose false, true (the whole model) or 'backbone'")
        if compile == "backbone":
            self.model.backbone.compile()
        elif compile:
            self.model.compile()
        self.criterion = instantiate(dict(criterion), num_classes=num_classes)
        if isinstance(self.criterion, BoxCriterion) != (task == "detection"):
            raise ValueError(
                f"data.task={task} with the criterion {type(self.criterion).__name__}: box detectors "
                "(head=deformable_detr, head=rtdetr) train with data.task=detection, mask heads with panoptic / "
                "instance / semantic"
            )
        self.postprocess = self._build_postprocessor(dict(postprocess or {}))
        self.evaluations = tuple(evaluations) if evaluations is not None else EVALUATIONS[task]
        self.optimizer_config = dict(optimizer or {})
        self.scheduler_config = dict(scheduler or {})
        self.output_dir = output_dir
        self.evaluators: dict[str, Any] = {}
        self.last_results: dict[str, float] = {}
        # The training step of loaded weights (`engine.loading.load_module`: a .ckpt's global_step, an export's
        # recorded one); outside fit it labels the results, since a fresh Trainer's global_step is 0.
        self.checkpoint_step: int | None = None
        self._resumed_rng_states: dict[str, Any] | None = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trusted_targets: Iterable[str] = (),
        **kwargs: Any,
    ) -> SegmentationModule:
        """Lightning's loader under this project's trust rules: the file is read once with
        `torch.load(weights_only=True)` (whatever `weights_only` says), and its hyper-parameters may name only
        allowlisted model parts and `trusted_targets` (`densepred.engine.trust.check_model_config`), checked
        before anything is built. `hparams_file` and `kwargs` come from the caller and are trusted."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            source = f"checkpoint={checkpoint_path}"
            data = Path(checkpoint_path).expanduser().read_bytes()
        else:
            source, data = "checkpoint", checkpoint_path.read()
        checkpoint = load_checkpoint_file(io.BytesIO(data), source=source)
        check_model_config(checkpoint.get("hyper_parameters", {}), source=source, trusted_targets=trusted_targets)
        del checkpoint
        return super().load_from_checkpoint(
            io.BytesIO(data), map_location, hparams_file, strict, weights_only=True, **kwargs
        )

    # ------------------------------------------------------------------ model
    def _build_postprocessor(self, config: dict) -> torch.nn.Module:
        if self.task == "detection":  # boxes: only the top-k applies, the mask thresholds do not
            from densepred.heads.box_postprocess import BoxPostProcessor

            return BoxPostProcessor(**{k: v for k, v in config.items() if k not in MASK_POSTPROCESS_KEYS})
        from densepred.heads.postprocess import PostProcessor

        things = [k for k, c in enumerate(self.metadata["categories"]) if c["isthing"]]
        return PostProcessor(
            num_classes=int(self.metadata["num_classes"]),
            thing_classes=things,
            semantic_on=self.task in ("semantic", "panoptic"),
            panoptic_on=self.task == "panoptic",
            instance_on=self.task in ("instance", "panoptic"),
            **config,
        )

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """images (B, 3, H, W) normalised (`self.model.preprocess`) -> raw head outputs."""
        return self.model(images)

    def _outputs(self, batch: Mapping[str, Any], targets: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Raw head outputs for a collated batch: its raw images normalised by the model, padding zeroed
        (`targets`, given to the head: a detection batch's normalised targets in training)."""
        return self.model(self.model.preprocess(batch["images"], batch["image_sizes"]), targets)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Post-processed predictions at each image's original size (see docs/architecture.md). An empty
        batch (predict.py's, when every image of it was unreadable and skipped) predicts nothing."""
        if batch["images"].shape[0] == 0:
            return []
        if self.task == "detection":  # boxes are normalised by the padded size
            padded = batch["images"].shape[-2:]
            return self.postprocess(self._outputs(batch), padded, batch["image_sizes"], batch["orig_sizes"])
        return self.postprocess(self._outputs(batch), batch["image_sizes"], batch["orig_sizes"])

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """`Trainer.predict`: the post-processed predictions of the batch (a prediction writer saves them)."""
        return self.predict(batch)

    # --------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A head whose training follows the step (EoMT's mask annealing) gets it through its
        `set_training_progress(step)` hook: the optimizer steps done before this batch."""
        set_progress = getattr(self.model.head, "set_training_progress", None)
        if set_progress is not None:
            set_progress(self.global_step)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self.task == "detection":  # boxes (cx, cy, w, h) normalised by the padded size, for head and criterion
            targets = normalized_targets(batch["targets"], batch["images"].shape[-2:])
            outputs = self._outputs(batch, targets)
        else:
            targets, outputs = batch["targets"], self._outputs(batch)
        losses = self.criterion(outputs, targets)
        loss = torch.stack(list(losses.values())).sum()
        batch_size = batch["images"].shape[0]
        main = {f"train/{name}": value for name, value in losses.items() if not name[-1].isdigit()}
        self.log_dict(main, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------- resuming
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the global random state (point sampling, dropout) for an exact resume, every rank's under DDP
        (Lightning calls this on all ranks and writes rank 0's dict). The data order and the augmentations do
        not draw from it: the DataModule's state (its sampler's position) resumes them."""
        states = rng_states()
        checkpoint["rng_states"] = states
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states_per_rank"] = gathered

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            per_rank = checkpoint.get("rng_states_per_rank") or []
            if len(per_rank) == self.trainer.world_size:  # this rank's streams (else rank 0's, or the one's)
                self._resumed_rng_states = per_rank[self.trainer.global_rank]
            else:
                self._resumed_rng_states = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        """A resumed run continues the random streams where the checkpoint left them: set here, after every
        restore and before the first batch is drawn, as the uninterrupted run draws it."""
        if self._resumed_rng_states is not None:
            set_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_adamw(self.model, **self.optimizer_config)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, total_steps=max(total, 1), **self.scheduler_config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        """Build the evaluators of the split(s) of `stage` from the ground truth the datamodule declares."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        for split in {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, []):
            self.evaluators[split] = build_evaluators(self.evaluations, datamodule.ground_truth(split))

    def _eval_step(self, split: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        predictions = self.predict(batch)
        for evaluator in self.evaluators.get(split, {}).values():
            evaluator.process(batch["image_ids"], predictions)
        return predictions

    def _eval_epoch_end(self, split: str, write_files: bool) -> dict[str, float]:
        evaluators = self.evaluators.get(split, {})
        results: dict[str, float] = {}
        for evaluator in evaluators.values():
            results.update(evaluator.evaluate())  # a collective: every rank gets the same numbers
        # Every rank holds the same gathered numbers: sync_dist=True marks them as synced (no "use sync_dist=True"
        # warning per metric under DDP) and rank_zero_only=True makes Lightning's reduction a no-op (lightning 2.6
        # `_Sync`: reduce only if sync_dist and not rank_zero_only); logged on every rank, so all can monitor them.
        logged = {f"{split}/{k}": float(v) for k, v in results.items()}
        self.log_dict(logged, sync_dist=True, rank_zero_only=True)
        step = self.evaluated_step
        folder = self._eval_folder(split)
        if write_files and folder is not None:
            for evaluator in evaluators.values():
                evaluator.write(folder)
        if self.trainer.is_global_zero:
            tables = "\n".join(evaluator.table() for evaluator in evaluators.values())
            log.info(f"{split} metrics at step {step}:\n{tables}")
            if folder is not None:
                metrics = {k: float(v) for k, v in results.items()}  # NaN is written as null
                atomic_write_json(folder / f"metrics_step{step:07d}.json", metrics)
        for evaluator in evaluators.values():
            evaluator.reset()
        self.last_results = results
        return results

    @property
    def evaluated_step(self) -> int:
        """The training step the evaluated weights are from: the trainer's during fit, else the loaded
        checkpoint's (`checkpoint_step`, when known) or the trainer's."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return self.global_step if fitting or self.checkpoint_step is None else int(self.checkpoint_step)

    def _eval_folder(self, split: str) -> Path | None:
        return Path(self.output_dir) / f"eval_{split}" if self.output_dir else None

    def on_validation_epoch_start(self) -> None:
        for evaluator in self.evaluators.get("val", {}).values():
            evaluator.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._eval_epoch_end("val", write_files=False)

    def on_test_epoch_start(self) -> None:
        for evaluator in self.evaluators.get("test", {}).values():
            evaluator.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", write_files=True)


def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), numpy and Python, in types that
    `torch.load(weights_only=True)` reads (numpy's key array as a tensor)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what `rng_states` saved (CUDA states only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
