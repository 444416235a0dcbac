"""Export a model for deployment: `python export.py checkpoint=PATH format=onnx|torch_export [output=DIR]`.

PATH is a train.py checkpoint (.ckpt) or a folder with config.json + model.safetensors (a run's export, or
`python -m densepred.convert` output), loaded by the project's trusted loading (nothing a file names is run).
Writes DIR/model.onnx (or model.pt2), DIR/metadata.json (classes, thresholds, normalisation, verification)
and DIR/postprocess.py (NumPy-only post-processing); see densepred/deploy/export.py and the README's
Deployment section.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from densepred.deploy.export import export_model
from densepred.engine.build import container

log = logging.getLogger(__name__)


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> str:
    try:
        model_file = export_model(
            cfg.checkpoint,
            format=cfg.format,
            output=cfg.output,
            opset=int(cfg.opset),
            dynamic=bool(cfg.dynamic),
            input_dtype=cfg.input_dtype,
            size_divisibility=int(cfg.size_divisibility),
            task=cfg.task,
            check=bool(cfg.verify),
            postprocess=container(cfg.postprocess),
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    log.info(f"exported {model_file}")
    return str(model_file)


if __name__ == "__main__":
    main()
