"""The backbone contract shared by native and timm backbones (Hugging Face backbone semantics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .checkpoint import LoadReport, save_backbone
from .pretrained import load_pretrained as _load_pretrained
from .selection import get_aligned_output_features_output_indices


@dataclass
class BackboneOutput:
    """`feature_maps`: one (B, C_i, H_i, W_i) tensor per selected stage, in stage order."""

    feature_maps: tuple[torch.Tensor, ...]


@dataclass
class TokenContinuation:
    """A token backbone stopped before its last `len(blocks)` blocks, for a head that runs them itself
    (`Backbone.continuation`; EoMT's queries join the tokens there).

    `tokens` (B, num_prefix_tokens + h * w, D): the sequence after the first blocks, the class / register
    tokens first, then the patches row by row; `grid` (h, w); `patch_size` (p): the patches tile the input
    zero-padded bottom/right to (h * p, w * p); `input_size`: the input's (H, W) before that padding.
    `blocks`: the remaining blocks, in order, each `block(tokens, attn_mask=None)` -> tokens of the same
    shape, any sequence length, `attn_mask` bool (B, 1, T, T), True where a token attends; `norm`: the
    backbone's final norm. The blocks stay the backbone's modules (their weights, lr decay, freezing and
    activation checkpointing are the backbone's).
    """

    tokens: torch.Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: int
    input_size: tuple[int, int]
    blocks: Sequence[nn.Module]
    norm: nn.Module


class Backbone(nn.Module):
    """A multi-scale feature extractor with selectable output stages.

    Subclasses describe every stage (`stage_names`, channels, strides), list the modules that make
    up each stage (`stage_modules`) and compute the selected maps (`forward_features`). This class
    keeps `out_features` / `out_indices` aligned and verified, reports `channels` and `strides` of
    the selection for necks and heads, and freezes early stages.

    `family` ("resnet", "swin", "convnext", "timm") tells loaders which checkpoint layouts apply;
    `config_target` is the `_target_` a saved config.json names (the key of `_registry.register_class`).
    """

    family: ClassVar[str | None] = None
    # Whether the backbone is convolutional: its convolutions run faster in channels_last (NHWC) memory format,
    # which the Segmenter then uses by default.
    convolutional: ClassVar[bool] = False
    config_target: ClassVar[str | None] = None

    def __init__(
        self,
        stage_names: Sequence[str],
        stage_channels: Sequence[int],
        stage_strides: Sequence[int],
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not len(stage_names) == len(stage_channels) == len(stage_strides):
            raise ValueError("stage_names, stage_channels and stage_strides must have one entry per stage")
        self.stage_names = list(stage_names)
        self.out_feature_channels = dict(zip(self.stage_names, (int(c) for c in stage_channels), strict=True))
        self.out_feature_strides = dict(zip(self.stage_names, (int(s) for s in stage_strides), strict=True))
        self.in_channels = in_channels
        self.frozen_stages = 0  # stages [0, frozen_stages) are frozen
        self._out_features, self._out_indices = get_aligned_output_features_output_indices(
            out_features, out_indices, self.stage_names
        )

    # ---- description for saving -----------------------------------------------------------------
    def _set_config(self, **kwargs: Any) -> None:
        """Record the constructor arguments (JSON values) that, with `config_target`, rebuild this backbone."""
        if self.config_target is None:
            raise TypeError(f"{type(self).__name__} has no config_target: set the class attribute to save it")
        self._config = {"_target_": self.config_target, **kwargs}

    @property
    def config(self) -> dict[str, Any]:
        """`_target_` and the constructor arguments of this backbone, with its current selection."""
        if not hasattr(self, "_config"):
            raise NotImplementedError(f"{type(self).__name__} does not record its config (call _set_config)")
        return {**self._config, "out_features": self.out_features}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` (`config`) and `model.safetensors` to `folder`; reload with
        `AutoBackbone.from_pretrained(folder)`."""
        return save_backbone(self, folder)

    def load_pretrained(self, name_or_path: str | Path, revision: str | None = None) -> LoadReport:
        """Load weights of this architecture from a Hub repo id, a folder or a weights file (any layout
        `AutoBackbone.from_pretrained` reads); returns the `LoadReport` (also kept as `load_report`)."""
        return _load_pretrained(self, str(name_or_path), revision=revision)

    def adapt_pretrained(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pretrained weights in this backbone's layout, made to fit it before loading (a ViT resamples another
        patch size or position grid); the default keeps them as they are."""
        return state_dict

    # ---- selection ------------------------------------------------------------------------------
    @property
    def out_features(self) -> list[str]:
        return list(self._out_features)

    @out_features.setter
    def out_features(self, out_features: Sequence[str] | None) -> None:
        self.set_outputs(out_features=out_features)

    @property
    def out_indices(self) -> list[int]:
        return list(self._out_indices)

    @out_indices.setter
    def out_indices(self, out_indices: Sequence[int] | None) -> None:
        self.set_outputs(out_indices=out_indices)

    def set_outputs(self, out_features: Sequence[str] | None = None, out_indices: Sequence[int] | None = None) -> None:
        """Select other output stages on a built backbone; both attributes are re-aligned."""
        self._out_features, self._out_indices = get_aligned_output_features_output_indices(
            out_features, out_indices, self.stage_names
        )
        self._outputs_changed()

    def _outputs_changed(self) -> None:
        """Keep per-output modules (`out_norms`, where a backbone has them) in step with the selection."""
        if isinstance(getattr(self, "out_norms", None), OutputNorms):
            self.out_norms.sync({name: self.out_feature_channels[name] for name in self._out_features})

    @property
    def selected_positions(self) -> list[int]:
        """Positive positions in `stage_names` of the selected stages, ascending."""
        return [i % len(self.stage_names) for i in self._out_indices]

    # ---- input statistics -----------------------------------------------------------------------
    @property
    def pixel_mean(self) -> tuple[float, ...]:
        """Per-channel RGB mean, in 0-1 units, that the pretrained weights expect (the Segmenter normalises
        with it). Native backbones: ImageNet's, as their transformers image processors; TimmBackbone: its
        timm `pretrained_cfg`'s."""
        return tuple(IMAGENET_DEFAULT_MEAN)

    @property
    def pixel_std(self) -> tuple[float, ...]:
        """Per-channel RGB standard deviation, in 0-1 units (see `pixel_mean`)."""
        return tuple(IMAGENET_DEFAULT_STD)

    # ---- description for necks and heads --------------------------------------------------------
    @property
    def channels(self) -> list[int]:
        return [self.out_feature_channels[name] for name in self._out_features]

    @property
    def strides(self) -> list[int]:
        return [self.out_feature_strides[name] for name in self._out_features]

    @property
    def feature_info(self) -> list[dict]:
        """timm-style description of every stage: name, channels (`num_chs`) and `reduction`."""
        return [
            dict(name=n, num_chs=self.out_feature_channels[n], reduction=self.out_feature_strides[n])
            for n in self.stage_names
        ]

    # ---- freezing -------------------------------------------------------------------------------
    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules computing each stage of `stage_names` (used for freezing)."""
        raise NotImplementedError

    def repeated_blocks(self) -> list[nn.Module]:
        """The stages after the stem, the units of activation checkpointing (`utils.checkpointing`)."""
        return [module for modules in self.stage_modules()[1:] for module in modules]

    def freeze_stages(self, freeze_at: int) -> None:
        """Freeze the stages at positions 0..freeze_at: -1 nothing, 0 the stem, N the stem and stages 1..N.

        Frozen parameters stop requiring gradients and frozen modules stay in eval mode (BatchNorm
        statistics, dropout and drop-path stay fixed) even when the model is put in training mode.
        """
        if not -1 <= freeze_at < len(self.stage_names):
            raise ValueError(
                f"freeze_at={freeze_at} is out of range: use -1 (nothing), 0 (the stem) up to "
                f"{len(self.stage_names) - 1} (every stage of {self.stage_names})"
            )
        self.frozen_stages = freeze_at + 1
        for modules in self.stage_modules()[: self.frozen_stages]:
            for module in modules:
                module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if not self.frozen_stages:
            return self
        for modules in self.stage_modules()[: self.frozen_stages]:
            for module in modules:
                module.eval()
        return self

    # ---- forward --------------------------------------------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        """Return the NCHW maps of the stages at `positions` (ascending positive indices)."""
        raise NotImplementedError

    def continuation(self, pixel_values: torch.Tensor, num_blocks: int) -> TokenContinuation:
        """(B, in_channels, H, W) -> the tokens before the last `num_blocks` blocks and those blocks, for a head
        that continues the backbone (its `backbone_blocks`; docs/architecture.md). Token backbones (ViTs)
        implement it."""
        raise ValueError(
            f"{type(self).__name__} has no token blocks for a head that continues the backbone (backbone_blocks="
            f"{num_blocks}); use a plain ViT backbone (densepred.backbones.ViTBackbone, e.g. backbone=dinov2_small)"
        )

    def forward(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """(B, in_channels, H, W) -> BackboneOutput with one NCHW map per selected stage."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(pixel_values.shape)}"
            )
        return BackboneOutput(feature_maps=tuple(self.forward_features(pixel_values, self.selected_positions)))

    def extra_repr(self) -> str:
        return f"out_features={self._out_features}, channels={self.channels}, strides={self.strides}"


class OutputNorms(nn.ModuleDict):
    """One norm per selected stage, keyed by stage name (HF's `hidden_states_norms`).

    `sync` follows a new selection: norms of stages still selected are kept, newly selected stages
    get a freshly initialised norm, and deselected ones are removed so that no parameter sits
    unused (which distributed training would reject).
    """

    def __init__(self, make_norm, channels: dict[str, int]) -> None:
        super().__init__()
        self._make_norm = make_norm
        self.sync(channels)

    def sync(self, channels: dict[str, int]) -> None:
        for name in [n for n in self.keys() if n not in channels]:
            del self[name]
        for name, num_channels in channels.items():
            if name not in self:
                self[name] = self._make_norm(num_channels)
