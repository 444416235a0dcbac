"""Evaluate a checkpoint: `python evaluate.py checkpoint=PATH [data=...]`.

PATH is a train.py checkpoint (.ckpt) or a folder with config.json + model.safetensors (a run's export,
or a converted Hugging Face model from `python -m densepred.convert.models`). Logs and writes PQ / AP / mIoU.
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from densepred.engine.build import build_datamodule, container, metadata_dict
from densepred.engine.loading import load_module

log = logging.getLogger(__name__)


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    datamodule = build_datamodule(cfg)
    module = load_module(
        cfg.checkpoint,
        metadata=metadata_dict(datamodule.metadata),
        task=cfg.data.task,
        postprocess=container(cfg.postprocess),
        output_dir=str(cfg.paths.output_dir),
    )
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule)
    if rank_zero_only.rank == 0:
        log.info(f"results written under {cfg.paths.output_dir}/eval_test")
    return module.last_results


if __name__ == "__main__":
    main()
