"""MaskFormer-style heads, the matcher, losses and post-processing."""
