"""Errors raised for bad input data. Every message names the file, the id and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data (a file, an annotation or a config key); the message says what to fix."""


class BadImageError(DataError):
    """An image or label file that is missing or cannot be decoded.

    Training datasets built with `skip_bad_images=True` skip such a sample (counted and reported once per
    epoch); evaluation datasets raise it, since evaluation must see every image.
    """
