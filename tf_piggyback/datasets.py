"""Datasets: the embedded digits tasks (from scikit-learn's 8x8 digits, no download needed).

Each variant is a task for the digits backbone, which is pretrained on `base`:
- `base`: digits 0-4 (the backbone's own "ImageNet").
- `upper`: digits 5-9, labelled 0-4 — new classes, same domain.
- `inverted`: all ten digits with inverted intensities — a domain shift (§5.3).
- `all`: all ten digits.
Images are upsampled to 32x32x1 and hold raw 0-255 pixel values; the split is fixed.
"""

import functools

import numpy as np
import tensorflow as tf

DIGITS_VARIANTS = ("base", "upper", "inverted", "all")
DIGITS_IMAGE_SIZE = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)
    images = tf.image.resize(images, (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), method="bilinear").numpy()
    images = np.clip(images, 0.0, 255.0)
    labels = digits.target.astype(np.int64)
    test = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(SPLIT_SEED)
    for digit in range(10):  # stratified: the same fraction of every digit in test
        idx = rng.permutation(np.flatnonzero(labels == digit))
        test[idx[: int(round(len(idx) * TEST_FRACTION))]] = True
    return images, labels, test


def load_digits_variant(variant):
    """Returns `(x_train, y_train), (x_test, y_test), class_names` for a digits variant.

    Args:
        variant: one of `DIGITS_VARIANTS`.

    Example:
    >>> (x, y), (xt, yt), names = load_digits_variant("upper")
    >>> names
    ['5', '6', '7', '8', '9']
    """
    if variant not in DIGITS_VARIANTS:
        raise ValueError(
            f"unknown digits variant {variant!r}; choose one of {', '.join(DIGITS_VARIANTS)} (e.g. digits:upper)"
        )
    images, labels, test = _digits_split()
    digits = {"base": range(0, 5), "upper": range(5, 10)}.get(variant, range(10))
    keep = np.isin(labels, list(digits))
    x, y = images[keep], labels[keep] - digits.start
    if variant == "inverted":
        x = 255.0 - x
    is_test = test[keep]
    names = [str(d) for d in digits]
    return (x[~is_test], y[~is_test]), (x[is_test], y[is_test]), names


def load_dataset(spec):
    """Resolves a dataset spec; returns `(x_train, y_train), (x_test, y_test), class_names`.

    Specs: `digits:VARIANT` (embedded). Example: `load_dataset("digits:inverted")`.
    """
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return load_digits_variant(arg)
    raise ValueError(f"unknown dataset {spec!r}; use digits:VARIANT with VARIANT one of {', '.join(DIGITS_VARIANTS)}")
