"""Datasets: dataset specs resolved to `tf.data` splits of raw 0-255 images.

Specs (DESIGN 3.4):
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

import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow as tf

from tf_piggyback.images import center_crop, fit_image, paper_scale, scale_shorter_side, to_float, to_uint8

DIGITS_VARIANTS = ("base", "upper", "inverted", "all")
# Pixels of a digit's strokes: ink above half intensity (the images are 0-255 after upsampling).
STROKE_THRESHOLD = 127.5
DIGITS_IMAGE_SIZE = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0
# tfds names whose test split has private labels (-1): evaluated on validation instead.
PRIVATE_TEST_LABELS = ("visual_domain_decathlon",)
DEFAULT_CACHE_MB = 1024  # training images kept in memory (uint8) by default; the rest stream
LABEL_CHECK = 64  # labels read from each tfds split to refuse one without labels
PROTOCOLS = ("simple", "paper")
# The paper's protocol (see `load_dataset`): tfds datasets cropped to their bounding boxes, and
# those trained on train + validation.
BOXED = ("caltech_birds2011", "cars196")
TRAIN_PLUS_VALIDATION = ("oxford_flowers102",)


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




@dataclasses.dataclass
class Splits:
    """A dataset's train and test splits: unbatched `(image float32 HxWxC 0-255, label int64)`;
    with `dense`, each label is a map `[H, W]` of per-pixel classes (segmentation)."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list
    train_size: int
    test_size: int
    # `k -> (first k training examples, seed -> the rest in an order of that seed)`, each read
    # without touching the other (a `skip` would decode the skipped images): what the cache
    # budget splits on, and what `epoch` orders afresh.
    train_parts: object = dataclasses.field(default=None, repr=False)
    dense: bool = False
    # `seed -> the training examples in a fresh order of that seed`, each once (`load_dataset`).
    epoch: object = dataclasses.field(default=None, repr=False)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The first bytes of each format tf.io.decode_image reads.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


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
            is 256/224 of the input size (random-sized crops are taken per epoch:
            `images.random_sized_crop`), test images scaled so and center-cropped.

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
            return lambda seed: tf.data.Dataset.from_tensor_slices(_permuted(seed, images, labels))

        splits = Splits(tf.data.Dataset.from_tensor_slices((x, y)), tf.data.Dataset.from_tensor_slices((xt, yt)),
                        names, len(x), len(xt), lambda k: (tf.data.Dataset.from_tensor_slices((x[:k], y[:k])),
                                                           in_order(x[k:], y[k:])),
                        dense=kind == "digits_seg")
    elif kind == "folder":
        splits = _folder(arg, split_seed)
    elif kind == "tfds":
        splits = _tfds(arg, protocol)
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
        fit = functools.partial(fit_image, shape=shape)
        fit_train, stored = fit, shape
        if protocol == "paper":
            side = paper_scale(shape)
            fit_train = functools.partial(scale_shorter_side, side=side, channels=shape[-1])
            fit = functools.partial(center_crop, side=side, shape=shape)
            stored = (side, side, shape[-1])  # at least: the shorter side is `side`
        if cache_bytes < 0:
            raise ValueError(f"the cache budget must be >= 0 bytes. Received: cache_bytes={cache_bytes}")
        cached = min(splits.train_size, int(cache_bytes) // int(np.prod(stored)))
        head, tail = splits.train_parts(cached)
        cache = head.map(fit_train, num_parallel_calls=tf.data.AUTOTUNE).map(to_uint8).cache()
        splits.epoch = functools.partial(_epoch, cache=cache, cached=cached, size=splits.train_size,
                                         tail=lambda seed: tail(seed).map(fit_train, num_parallel_calls=tf.data.AUTOTUNE))
        if cached > 0:
            splits.train = cache.map(to_float) if cached == splits.train_size else cache.map(to_float).concatenate(
                tail(None).map(fit_train, num_parallel_calls=tf.data.AUTOTUNE))
        else:
            splits.train = splits.train.map(fit_train, num_parallel_calls=tf.data.AUTOTUNE)
        splits.test = splits.test.map(fit, num_parallel_calls=tf.data.AUTOTUNE)
    return splits


def _epoch(seed, cache, cached, size, tail):
    """One epoch of training examples in a fresh order of `seed`: the cached part (uint8 in
    memory, filled on the first epoch) shuffled whole, which holds only references to the
    cached images, and the streamed rest in its own order of `seed` (`Splits.train_parts`),
    drawn from at random in proportion to their sizes, so every image's place in an epoch is
    independent of its place in the last one, whatever the cache budget."""
    parts, weights = [], []
    if cached > 0:
        parts.append(cache.shuffle(cached, seed=seed, reshuffle_each_iteration=False).map(to_float))
        weights.append(cached / size)
    if cached < size:
        parts.append(tail(seed))
        weights.append(1 - cached / size)
    if len(parts) == 1:
        return parts[0]
    return tf.data.Dataset.sample_from_datasets(parts, weights=weights, seed=seed, stop_on_empty_dataset=False)


def _permuted(seed, *arrays):
    """`arrays` in one order of `seed` (None: as they are)."""
    if seed is None:
        return arrays
    order = np.random.default_rng(seed).permutation(len(arrays[0]))
    return tuple(np.asarray(a)[order] for a in arrays)


def to_arrays(dataset):
    """An unbatched `(image, label)` dataset as NumPy `(images [N, H, W, C], labels [N] or [N, H, W])`."""
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.stack(images), np.array(labels)


def _list_class_folders(root):
    if not os.path.isdir(root):
        raise ValueError(f"dataset folder {root!r} does not exist; pass folder:PATH with one sub-folder per class")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files, labels = [], []
    for label, name in enumerate(names):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, filename))
                    labels.append(label)
    if len(names) < 2:
        raise ValueError(f"dataset folder {root!r} has {len(names)} class sub-folder(s); it needs at least 2")
    readable = np.array([_is_image(f) for f in files], dtype=bool)
    if not readable.all():
        skipped = [os.path.relpath(f, root) for f in np.array(files)[~readable]]
        logging.warning("dataset folder %s: skipped %d of %d files that are not images: %s%s", root, len(skipped),
                        len(files), ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
        files, labels = list(np.array(files)[readable]), list(np.array(labels)[readable])
    empty = [n for i, n in enumerate(names) if i not in set(labels)]
    if empty:
        raise ValueError(f"dataset folder {root!r}: class folder(s) {', '.join(empty)} hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return names, np.array(files), np.array(labels, dtype=np.int64)


def _is_image(path):
    """Whether a file starts like a JPEG, PNG, GIF or BMP (truncated ones are caught at decoding)."""
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(IMAGE_SIGNATURES)
    except OSError:
        return False


def _decode(path, label):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.cast(image, tf.float32), label


def _interleaved(files, labels):
    """`files` and `labels` in a fixed, seeded order that interleaves the classes.

    Folders list their files class by class; a shuffle buffer smaller than the dataset then
    sees a narrow band of classes per batch (10,000 of WikiArt's 42k images sorted by class
    gave ~23 of a possible ~29.5 classes per batch of 32). Permuting the list before decoding
    lets every later shuffle, the cached part of a budgeted cache, and the first images taken
    for int8 calibration span all classes. The permutation is fixed (`SPLIT_SEED`), so
    resuming repeats the same batches.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    return np.asarray(files)[order], np.asarray(labels)[order]


def _image_files(files, labels):
    """Decoded images of `files`."""
    # Files that are not images are skipped when listed; ones that fail to decode (truncated)
    # are dropped with a warning rather than stopping a long run (so the length is unknown
    # until read: `trainer.train` counts it then).
    ds = tf.data.Dataset.from_tensor_slices((files, labels)).map(_decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors(log_warning=True)


def _folder(root, seed):
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        names, files, labels = _list_class_folders(os.path.join(root, "train"))
        test_names, test_files, test_labels = _list_class_folders(os.path.join(root, "test"))
        if test_names != names:
            raise ValueError(f"dataset folder {root!r}: train/ and test/ have different class folders")
    else:
        names, all_files, all_labels = _list_class_folders(root)
        test = np.zeros(len(all_files), dtype=bool)
        rng = np.random.default_rng(seed)
        for label in range(len(names)):
            idx = rng.permutation(np.flatnonzero(all_labels == label))
            test[idx[: int(round(len(idx) * TEST_FRACTION))]] = True
        files, labels, test_files, test_labels = all_files[~test], all_labels[~test], all_files[test], all_labels[test]
    files, labels = _interleaved(files, labels)
    test_files, test_labels = _interleaved(test_files, test_labels)
    return Splits(_image_files(files, labels), _image_files(test_files, test_labels), names, len(files),
                  len(test_files), lambda k: (_image_files(files[:k], labels[:k]),
                                              lambda seed: _image_files(*_permuted(seed, files[k:], labels[k:]))))


def _tfds(name, protocol="simple"):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)
    except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
        raise ValueError(f"unknown TensorFlow Datasets name {name!r} ({type(e).__name__}); see tfds.list_builders()") from None
    splits = list(builder.info.splits.keys()) or ["train", "test"]  # none listed before download
    test_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    if name.startswith(PRIVATE_TEST_LABELS):
        # The Visual Decathlon keeps its test labels private (every label is -1); its own
        # tables, and the paper's Table 8, score the validation split.
        test_split = "validation"
    train_split, test_split = ("train", test_split) if test_split else ("train[:80%]", "train[80%:]")
    paper = protocol == "paper"
    if paper and name.split("/")[0] in TRAIN_PLUS_VALIDATION:
        train_split = "train+validation"  # Flowers-102: 2,040 training images (Table 1)
    boxed = paper and name.split("/")[0] in BOXED

    def load(split):
        try:
            datasets = tfds.load(name, split=split, as_supervised=not boxed)
        except Exception as e:
            raise ValueError(f"could not load tfds:{name} ({type(e).__name__}: {e}); download it with "
                             f"`tfds build {name}` or set TFDS_DATA_DIR") from None
        return [ds.map(_crop_to_box, num_parallel_calls=tf.data.AUTOTUNE) for ds in datasets] if boxed else datasets

    train, test = load([train_split, test_split])
    for split, ds in ((train_split, train), (test_split, test)):
        labels = np.array([int(label) for _, label in ds.take(LABEL_CHECK)])
        if labels.size and (labels < 0).all():
            raise ValueError(f"tfds:{name} split {split!r} has no labels (all {labels.size} checked are negative: "
                             "private test labels); evaluate on a split with labels, such as validation")

    def train_parts(k):
        # Sliced by record, so neither part reads the other's (a `skip` would read the cached
        # part again every epoch). The rest streams in the stored order (records are read in
        # sequence, not by index): `trainer.epoch_batches`' window shuffles it.
        if k == 0:
            return train.take(0), lambda seed: train
        ranges = [("train", 0, _size(train))] if train_split == "train[:80%]" else [
            (part, 0, _size(load([part])[0])) for part in train_split.split("+")]
        total = sum(stop - start for _, start, stop in ranges)
        if k >= total:
            return train, lambda seed: train.take(0)
        head, rest = load([_records(ranges, 0, k), _records(ranges, k, total)])
        return head, lambda seed: rest

    return Splits(train, test, list(builder.info.features["label"].names), _size(train), _size(test), train_parts)


def _records(ranges, begin, end):
    """The tfds split of records `[begin, end)` of the concatenated `ranges` (`[(split, start,
    stop)]`), e.g. `train[1000:1020]+validation[0:1020]` for Flowers-102's train+validation past
    the first 1,000."""
    parts, offset = [], 0
    for name, start, stop in ranges:
        low, high = max(begin - offset, 0), min(end - offset, stop - start)
        if low < high:
            parts.append(f"{name}[{start + low}:{start + high}]")
        offset += stop - start
    return "+".join(parts)


def _crop_to_box(example):
    """The paper's CUBS and Cars images: cropped to the object's bounding box (tfds `bbox`,
    normalized `[ymin, xmin, ymax, xmax]`), as the official code's data does."""
    image = example["image"]
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    box = example["bbox"]
    top, left = tf.cast(tf.round(box[0] * shape[0]), tf.int32), tf.cast(tf.round(box[1] * shape[1]), tf.int32)
    bottom = tf.maximum(tf.cast(tf.round(box[2] * shape[0]), tf.int32), top + 1)
    right = tf.maximum(tf.cast(tf.round(box[3] * shape[1]), tf.int32), left + 1)
    return image[top:bottom, left:right], example["label"]


def _size(ds):
    size = int(ds.cardinality())
    return size if size >= 0 else int(ds.reduce(0, lambda count, _: count + 1))
