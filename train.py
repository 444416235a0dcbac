"""Train (and test) a segmentation model: `python train.py [group=choice ...] [key=value ...]`.

Composes configs/train.yaml, seeds, builds data + model + trainer from the config, (optionally scores the
untrained model,) fits, then evaluates the best checkpoint. With no arguments it trains a small model on the
synthetic COCO-format dataset.
"""

from __future__ import annotations

import hydra
import lightning
from omegaconf import DictConfig

from densepred.engine.build import build_datamodule, build_module, build_trainer


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.metadata)
    trainer = build_trainer(cfg)
    if cfg.validate_before_fit and not cfg.ckpt_path:  # the untrained model's metrics (not on a resume)
        trainer.validate(module, datamodule=datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if not cfg.test_after_fit:
        return module.last_results
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    trainer.test(module, datamodule=datamodule, ckpt_path=best)
    return module.last_results


if __name__ == "__main__":
    main()
