"""Conversion of checkpoints into our format: transformers MaskFormer / Mask2Former models (`model`,
`mask2former`, `maskformer`) and backbones of any source; `python -m densepred.convert SRC DST` (`cli`)."""
