"""Conversion of transformers checkpoints (backbones and whole MaskFormer / Mask2Former models)."""
