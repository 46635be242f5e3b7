"""Datasets: dataset specs resolved to `tf.data` splits of raw 0-255 images.

Specs (BUILD.md, "Interfaces"):
- `digits:VARIANT` — embedded, from scikit-learn's 8x8 digits (no download needed);
- `tfds:NAME[/CONFIG]` — any TensorFlow Datasets image classification set (e.g. the paper's
  `caltech_birds2011`, `cars196`, `oxford_flowers102`, `visual_domain_decathlon/aircraft`);
- `folder:PATH` — one sub-folder per class; `PATH/train` and `PATH/test` when present, else a
  seeded split.

The embedded digits tasks:

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

from tf_piggyback.data.images import (WHOLE_IMAGE, center_crop, decode_random_sized_crop, fit_image, paper_scale,
                                      random_sized_crop, scale_shorter_side, to_float, to_uint8)
from tf_piggyback.data.sources import SPLIT_SEED, TEST_FRACTION, Splits, folder_splits, permuted, tfds_splits

DIGITS_VARIANTS = ("base", "upper", "inverted", "all")
# Pixels of a digit's strokes: ink above half intensity (the images are 0-255 after upsampling).
STROKE_THRESHOLD = 127.5
DIGITS_IMAGE_SIZE = 32
DEFAULT_CACHE_MB = 1024  # training images kept in memory (uint8) by default; the rest stream
PROTOCOLS = ("simple", "paper")


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


def load_digits_segmentation(variant):
    """The digits variant as a segmentation task (§6, at demo scale): per pixel, 0 for background
    and `1 + class` on the digit's strokes (ink above half intensity; dark ink when inverted).

    Returns `(x_train, maps_train), (x_test, maps_test), class_names` with int64 maps `[N, H, W]`.

    Example:
    >>> (x, maps), _, names = load_digits_segmentation("upper")
    >>> names[:3], maps.shape[1:]
    (['background', '5', '6'], (32, 32))
    """
    (x, y), (xt, yt), names = load_digits_variant(variant)

    def maps(images, labels):
        ink = 255.0 - images[..., 0] if variant == "inverted" else images[..., 0]
        return np.where(ink > STROKE_THRESHOLD, labels[:, None, None] + 1, 0).astype(np.int64)

    return (x, maps(x, y)), (xt, maps(xt, yt)), ["background", *names]




def load_dataset(spec, image_shape=None, split_seed=SPLIT_SEED, cache_bytes=0, protocol="simple"):
    """Resolves a dataset spec to `Splits` with images of `image_shape` (default: as stored).

    Args:
        spec: `digits:VARIANT`, `digits_seg:VARIANT` (per-pixel labels,
            `load_digits_segmentation`), `tfds:NAME[/CONFIG]` or `folder:PATH`.
        image_shape: `(height, width, channels)` the backbone takes; images are resized
            (bilinear) and converted between grayscale and RGB to fit.
        split_seed: the seed of the held-out split where the data has none (`folder:` without
            `train/` and `test/`). It is not the training seed: every run and CLI that uses the
            same value holds out the same images (runs record it in `config.json` and the task
            file's manifest, and `scripts/evaluate.py` reads it from there).
        cache_bytes: with `image_shape`, keep the first training images, resized and as uint8,
            in memory after the first epoch, as many as fit in this many bytes; the rest are
            read and decoded every epoch. 0: no cache. `Splits.epoch(seed)` gives every
            epoch its own order over both parts (`_epoch`). (A float32 cache of WikiArt's 42k
            images at 224 px would take 25 GB; uint8 takes 6.3 GB, so a budget is needed.)
        protocol: `"simple"`: every image resized to `image_shape`. `"paper"`: the data
            handling of the paper's experiments as the official code runs it: CUBS-200 and
            Stanford Cars cropped to their bounding boxes, Flowers-102 trained on train +
            validation (Table 1's 2,040 images); training images scaled so the shorter side
            is 256/224 of the input size, then each epoch's random-sized crop and flip (§4:
            `images.random_sized_crop`): `Splits.epoch` gives the crops, of `image_shape`. A
            streamed JPEG decodes only its crop's window (`images.decode_random_sized_crop`), from
            the full-size image, as the official code crops; a cached image is cropped from its
            scaled copy. Test images are scaled so and center-cropped.

    Example:
    >>> splits = load_dataset("digits:inverted")
    >>> splits.class_names[:3]
    ['0', '1', '2']
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}. Received: protocol={protocol!r}")
    kind, _, arg = spec.partition(":")
    if kind in ("digits", "digits_seg"):
        load = load_digits_variant if kind == "digits" else load_digits_segmentation
        (x, y), (xt, yt), names = load(arg)

        def in_order(images, labels):
            return lambda seed: tf.data.Dataset.from_tensor_slices(permuted(seed, images, labels))

        splits = Splits(tf.data.Dataset.from_tensor_slices((x, y)), tf.data.Dataset.from_tensor_slices((xt, yt)),
                        names, len(x), len(xt), lambda k: (tf.data.Dataset.from_tensor_slices((x[:k], y[:k])),
                                                           in_order(x[k:], y[k:])),
                        dense=kind == "digits_seg", train_sizes=lambda k: np.tile(x.shape[1:3], (min(k, len(x)), 1)))
    elif kind == "folder":
        splits = folder_splits(arg, split_seed)
    elif kind == "tfds":
        splits = tfds_splits(arg, protocol)
    else:
        raise ValueError(
            f"unknown dataset {spec!r}; use digits:VARIANT (VARIANT one of {', '.join(DIGITS_VARIANTS)}), "
            "digits_seg:VARIANT, tfds:NAME[/CONFIG] or folder:PATH"
        )
    if image_shape is None:
        splits.epoch = splits.train_parts(0)[1]
    else:
        if splits.dense and protocol != "simple":
            raise ValueError(f"{spec} has per-pixel labels; its crops would need them cropped too: use protocol=simple")
        shape = tuple(image_shape)
        if cache_bytes < 0:
            raise ValueError(f"the cache budget must be >= 0 bytes. Received: cache_bytes={cache_bytes}")
        fit = functools.partial(fit_image, shape=shape)
        fit_train = fit
        cached = min(splits.train_size, int(cache_bytes) // int(np.prod(shape)))
        if protocol == "paper":
            side = paper_scale(shape)
            fit_train = functools.partial(scale_shorter_side, side=side, channels=shape[-1])
            fit = functools.partial(center_crop, side=side, shape=shape)
            # Each image keeps its aspect ratio (shorter side `side`), so a 2:1 image takes twice
            # a square one's bytes: count each image's own, from its size, up to the budget.
            upper = min(splits.train_size, int(cache_bytes) // (side * side * shape[-1]))
            stored = scaled_bytes(splits.train_sizes(upper), side, shape[-1])
            cached = int(np.searchsorted(np.cumsum(stored), cache_bytes, side="right"))
        splits.cached = cached
        head, tail = splits.train_parts(cached)
        cache = head.map(fit_train, num_parallel_calls=tf.data.AUTOTUNE).map(to_uint8).cache()
        if protocol == "paper":  # each epoch's random-sized crops (§4), each image's of (seed, its place)
            streamed = splits.encoded_parts(cached) if splits.encoded_parts else (
                lambda seed: tail(seed).map(lambda x, y: (x, tf.constant(WHOLE_IMAGE), y)))
            crop = functools.partial(random_sized_crop, shape=shape)

            def epoch_tail(seed):
                return streamed(seed).enumerate().map(
                    lambda i, example: (decode_random_sized_crop(example[0], example[1], _key(seed, 2 * i + 1), shape),
                                        tf.cast(example[2], tf.int64)),
                    num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
        else:
            crop = None

            def epoch_tail(seed):
                return tail(seed).map(fit_train, num_parallel_calls=tf.data.AUTOTUNE)
        splits.epoch = functools.partial(_epoch, cache=cache, cached=cached, size=splits.train_size, tail=epoch_tail,
                                         crop=crop)
        if cached > 0:
            splits.train = cache.map(to_float) if cached == splits.train_size else cache.map(to_float).concatenate(
                tail(None).map(fit_train, num_parallel_calls=tf.data.AUTOTUNE))
        else:
            splits.train = splits.train.map(fit_train, num_parallel_calls=tf.data.AUTOTUNE)
        splits.test = splits.test.map(fit, num_parallel_calls=tf.data.AUTOTUNE)
    return splits


def _key(seed, index):
    """A stateless random op's seed for the image at `index` of an epoch of `seed`."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def _epoch(seed, cache, cached, size, tail, crop=None):
    """One epoch of training examples in a fresh order of `seed`: the cached part (uint8 in
    memory, filled on the first epoch) shuffled whole, which holds only references to the
    cached images, and the streamed rest in its own order of `seed` (`Splits.train_parts`),
    drawn from at random in proportion to their sizes, so every image's place in an epoch is
    independent of its place in the last one, whatever the cache budget. `crop(image, key)`
    crops each cached image (the paper protocol; the streamed ones come cropped)."""
    parts, weights = [], []
    if cached > 0:
        part = cache.shuffle(cached, seed=seed, reshuffle_each_iteration=False).map(to_float)
        if crop is not None:
            part = part.enumerate().map(lambda i, example: (crop(example[0], _key(seed, 2 * i)), example[1]),
                                        num_parallel_calls=tf.data.AUTOTUNE)
        parts.append(part)
        weights.append(cached / size)
    if cached < size:
        parts.append(tail(seed))
        weights.append(1 - cached / size)
    if len(parts) == 1:
        return parts[0]
    return tf.data.Dataset.sample_from_datasets(parts, weights=weights, seed=seed, stop_on_empty_dataset=False)


def scaled_bytes(sizes, side, channels):
    """uint8 bytes of images of `sizes` (`[n, 2]` heights and widths) scaled so the shorter side
    is `side`, as `images.scale_shorter_side` does (0 for a size of 0: an unreadable file)."""
    sizes = np.asarray(sizes, np.float32).reshape(-1, 2)
    shorter = sizes.min(axis=1)
    scale = np.float32(side) / np.where(shorter > 0, shorter, 1)
    new = np.maximum(np.round(sizes * scale[:, None]), side)
    return np.where(shorter > 0, new.prod(axis=1) * channels, 0).astype(np.int64)


def to_arrays(dataset):
    """An unbatched `(image, label)` dataset as NumPy `(images [N, H, W, C], labels [N] or [N, H, W])`."""
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.stack(images), np.array(labels)


