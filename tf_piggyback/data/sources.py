"""Where training images come from, as `Splits`: image folders and TensorFlow Datasets (the
embedded digits are in `datasets`, which resolves every spec)."""

import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow as tf

from tf_piggyback.data.images import WHOLE_IMAGE, box_pixels

TEST_FRACTION = 0.25
SPLIT_SEED = 0  # the held-out split's default seed, and the fixed order of a folder's files
# tfds names whose test split has private labels (-1): evaluated on validation instead.
PRIVATE_TEST_LABELS = ("visual_domain_decathlon", "glue")
LABEL_CHECK = 64  # labels read from each tfds split to refuse one without labels
# The paper's protocol (see `datasets.load_dataset`): tfds datasets cropped to their bounding
# boxes, and those trained on train + validation.
BOXED = ("caltech_birds2011", "cars196")
TRAIN_PLUS_VALIDATION = ("oxford_flowers102",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TEXT_EXTENSIONS = (".txt",)  # a text folder's files: one example each, UTF-8
# The first bytes of each format tf.io.decode_image reads.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


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
    # `k -> [k, 2]` (height, width) of the first k training images as stored (after a box crop),
    # read from their headers without decoding: what the paper protocol's cache budget counts.
    train_sizes: object = dataclasses.field(default=None, repr=False)
    # `k -> (seed -> the training examples past the first k, in an order of that seed, as
    # (encoded image, normalized box, label))`: the image's file bytes, so a crop can decode
    # only its window (`images.decode_random_sized_crop`); None where there are no files.
    encoded_parts: object = dataclasses.field(default=None, repr=False)
    cached: int = 0  # training images the cache keeps (`load_dataset`'s `cache_bytes`)


def permuted(seed, *arrays):
    """`arrays` in one order of `seed` (None: as they are)."""
    if seed is None:
        return arrays
    order = np.random.default_rng(seed).permutation(len(arrays[0]))
    return tuple(np.asarray(a)[order] for a in arrays)


def _list_class_folders(root, kind="images"):
    """`(class names, files, labels)` of a folder with one sub-folder per class: its images, or
    with `kind="text"` its text files (`TEXT_EXTENSIONS`)."""
    extensions, readable_as = (IMAGE_EXTENSIONS, _is_image) if kind == "images" else (TEXT_EXTENSIONS, _is_text)
    if not os.path.isdir(root):
        raise ValueError(f"dataset folder {root!r} does not exist; pass folder:PATH with one sub-folder per class")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files, labels = [], []
    for label, name in enumerate(names):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
            for filename in sorted(filenames):
                if filename.lower().endswith(extensions):
                    files.append(os.path.join(dirpath, filename))
                    labels.append(label)
    if len(names) < 2:
        raise ValueError(f"dataset folder {root!r} has {len(names)} class sub-folder(s); it needs at least 2")
    readable = np.array([readable_as(f) for f in files], dtype=bool)
    if not readable.all():
        skipped = [os.path.relpath(f, root) for f in np.array(files)[~readable]]
        logging.warning("dataset folder %s: skipped %d of %d files that are not %s: %s%s", root, len(skipped),
                        len(files), kind, ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
        files, labels = list(np.array(files)[readable]), list(np.array(labels)[readable])
    empty = [n for i, n in enumerate(names) if i not in set(labels)]
    if empty:
        raise ValueError(f"dataset folder {root!r}: class folder(s) {', '.join(empty)} hold no {kind} "
                         f"({', '.join(extensions)})")
    return names, np.array(files), np.array(labels, dtype=np.int64)


def _is_image(path):
    """Whether a file starts like a JPEG, PNG, GIF or BMP (truncated ones are caught at decoding)."""
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(IMAGE_SIGNATURES)
    except OSError:
        return False


def _is_text(path):
    """Whether a file reads as UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
        return True
    except (OSError, UnicodeDecodeError):
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


def folder_files(root, seed, kind="images"):
    """`(class names, (train files, labels), (test files, labels))` of an image folder (a text
    folder with `kind="text"`): one sub-folder per class, in `train/` and `test/`, or a quarter
    of each class held out by `seed`."""
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        names, files, labels = _list_class_folders(os.path.join(root, "train"), kind)
        test_names, test_files, test_labels = _list_class_folders(os.path.join(root, "test"), kind)
        if test_names != names:
            raise ValueError(f"dataset folder {root!r}: train/ and test/ have different class folders")
    else:
        names, all_files, all_labels = _list_class_folders(root, kind)
        test = np.zeros(len(all_files), dtype=bool)
        rng = np.random.default_rng(seed)
        for label in range(len(names)):
            idx = rng.permutation(np.flatnonzero(all_labels == label))
            test[idx[: int(round(len(idx) * TEST_FRACTION))]] = True
        files, labels, test_files, test_labels = all_files[~test], all_labels[~test], all_files[test], all_labels[test]
    return names, (files, labels), (test_files, test_labels)


def folder_splits(root, seed):
    """`Splits` of an image folder (`folder_files`)."""
    names, (files, labels), (test_files, test_labels) = folder_files(root, seed)
    files, labels = _interleaved(files, labels)
    test_files, test_labels = _interleaved(test_files, test_labels)
    return Splits(_image_files(files, labels), _image_files(test_files, test_labels), names, len(files),
                  len(test_files), lambda k: (_image_files(files[:k], labels[:k]),
                                              lambda seed: _image_files(*permuted(seed, files[k:], labels[k:]))),
                  train_sizes=lambda k: _image_sizes(files[:k]),
                  encoded_parts=lambda k: lambda seed: tf.data.Dataset.from_tensor_slices(
                      permuted(seed, files[k:], labels[k:])).map(_file_bytes, num_parallel_calls=tf.data.AUTOTUNE))


def _file_bytes(path, label):
    return tf.io.read_file(path), tf.constant(WHOLE_IMAGE), label


def _image_sizes(files):
    """`[n, 2]` (height, width) of image files, from their headers (Pillow reads no pixels);
    0 for a file it cannot read, which decoding drops too."""
    from PIL import Image  # imported here: only the paper protocol needs it

    sizes = np.zeros((len(files), 2), np.int64)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                sizes[i] = image.size[::-1]
        except Exception:  # noqa: BLE001 — OSError and Pillow's own errors alike: unreadable
            pass
    return sizes


def tfds_builder(name):
    """`tfds.builder(name)`, or a one-line ValueError for a name TensorFlow Datasets does not know."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name)
    except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
        raise ValueError(f"unknown TensorFlow Datasets name {name!r} ({type(e).__name__}); see tfds.list_builders()") from None


def tfds_split_names(name, builder):
    """`(train split, test split)` of a tfds set: `test`, else `validation`, else the last 20% of
    `train`; `validation` for sets whose test labels are private."""
    splits = list(builder.info.splits.keys()) or ["train", "test"]  # none listed before download
    test_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    if name.startswith(PRIVATE_TEST_LABELS):
        # The Visual Decathlon and GLUE keep their test labels private (every label is -1); their
        # own tables, and the paper's Table 8, score the validation split.
        test_split = "validation"
    return ("train", test_split) if test_split else ("train[:80%]", "train[80%:]")


def tfds_splits(name, protocol="simple"):
    """`Splits` of a TensorFlow Datasets image classification set (see `datasets.load_dataset`)."""
    import tensorflow_datasets as tfds

    builder = tfds_builder(name)
    train_split, test_split = tfds_split_names(name, builder)
    paper = protocol == "paper"
    if paper and name.split("/")[0] in TRAIN_PLUS_VALIDATION:
        train_split = "train+validation"  # Flowers-102: 2,040 training images (Table 1)
    boxed = paper and name.split("/")[0] in BOXED
    # ArrayRecord (`tfds build --file_format=array_record`) reads any record at any time; TFRecord
    # reads records in sequence only (and `tfds.load` does not read ArrayRecord at all).
    random_access = builder.info.file_format in tfds.core.file_adapters.FileFormat.with_random_access()

    def records(split, encoded=False, seed=None):
        """The example dicts of `split` (images decoded unless `encoded`): in the stored order,
        or, with random access and a `seed`, in a fresh order of that seed."""
        decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
        if not random_access:
            return tfds.load(name, split=split, decoders=decoders)
        source = tfds.data_source(name, split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return _random_access(source, builder.info.features, decoders, seed)

    def load(splits, seed=None):
        datasets = []
        for split in splits:
            try:
                ds = records(split, seed=seed)
            except Exception as e:
                raise ValueError(f"could not load tfds:{name} ({type(e).__name__}: {e}); download it with "
                                 f"`tfds build {name}` or set TFDS_DATA_DIR") from None
            datasets.append(ds.map(_crop_to_box if boxed else lambda e: (e["image"], e["label"]),
                                   num_parallel_calls=tf.data.AUTOTUNE))
        return datasets

    train, test = load([train_split, test_split])
    for split, ds in ((train_split, train), (test_split, test)):
        labels = np.array([int(label) for _, label in ds.take(LABEL_CHECK)])
        if labels.size and (labels < 0).all():
            raise ValueError(f"tfds:{name} split {split!r} has no labels (all {labels.size} checked are negative: "
                             "private test labels); evaluate on a split with labels, such as validation")

    @functools.lru_cache(maxsize=1)  # the split sizes, read once for train_parts, train_sizes and encoded_parts
    def ranges():
        if train_split == "train[:80%]":
            return [("train", 0, _size(train))]
        return [(part, 0, _size(load([part])[0])) for part in train_split.split("+")]

    def halves(k):
        """The tfds splits of the first k training records and of the rest ("": none)."""
        parts = ranges()
        total = sum(stop - start for _, start, stop in parts)
        return _records(parts, 0, min(k, total)), _records(parts, min(k, total), total)

    def train_parts(k):
        # Sliced by record, so neither part reads the other's (a `skip` would read the cached
        # part again every epoch). The rest streams in a fresh order of each epoch's seed with
        # random access (ArrayRecord), else in the stored order (TFRecord reads records in
        # sequence, not by index), which only `trainer.epoch_batches`' window shuffles.
        def ordered(split, stored):
            return (lambda seed: load([split], seed)[0]) if random_access else lambda seed: stored

        if k == 0:
            return train.take(0), ordered(train_split, train)
        head_split, rest_split = halves(k)
        if not rest_split:
            return train, lambda seed: train.take(0)
        head, rest = load([head_split, rest_split])
        return head, ordered(rest_split, rest)

    def train_sizes(k):
        # The first k records' image sizes from their encoded headers (nothing decoded), boxes applied.
        split = halves(k)[0]
        if not split:
            return np.zeros((0, 2), np.int64)
        sizes = records(split, encoded=True).map(functools.partial(_stored_size, boxed=boxed))
        return np.array([size.numpy() for size in sizes], np.int64).reshape(-1, 2)

    def encoded_parts(k):
        # The records past the first k, their images not decoded; ordered as `train_parts`' rest.
        rest = train_split if k == 0 else halves(k)[1]
        return lambda seed: records(rest, encoded=True, seed=seed).map(
            lambda example: (example["image"], example["bbox"] if boxed else tf.constant(WHOLE_IMAGE),
                             example["label"]))

    return Splits(train, test, list(builder.info.features["label"].names), _size(train), _size(test), train_parts,
                  train_sizes=train_sizes, encoded_parts=encoded_parts)


def _random_access(source, features, decoders, seed):
    """A tfds random-access source (`tfds.data_source`, raw bytes) as a `tf.data.Dataset` of
    example dicts, its records in order or in a permutation of `seed`: only the record bytes
    are fetched in Python; parsing and decoding run in the graph, in parallel."""
    order = np.arange(len(source)) if seed is None else np.random.default_rng(seed).permutation(len(source))
    fetch = functools.partial(tf.numpy_function, lambda i: source[int(i)], Tout=tf.string, stateful=False)
    return (tf.data.Dataset.from_tensor_slices(order)
            .map(lambda i: tf.ensure_shape(fetch([i]), []), num_parallel_calls=tf.data.AUTOTUNE)
            .map(lambda record: features.deserialize_example(record, decoders=decoders),
                 num_parallel_calls=tf.data.AUTOTUNE))


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
    """The paper's CUBS and Cars images: cropped to the object's bounding box, as the official
    code's data does."""
    image = example["image"]
    top, left, bottom, right = box_pixels(tf.shape(image)[:2], example["bbox"])
    return image[top:bottom, left:right], example["label"]


def _stored_size(example, boxed):
    """`[height, width]` of a tfds record's image as training reads it (cropped to its box when
    `boxed`), from the encoded image's header (JPEG) or, for other formats, by decoding it."""
    image = example["image"]
    if image.dtype == tf.string:
        shape = tf.cond(tf.io.is_jpeg(image), lambda: tf.image.extract_jpeg_shape(image)[:2],
                        lambda: tf.shape(tf.io.decode_image(image, expand_animations=False))[:2])
    else:  # decoded already (`tfds.testing.mock_data` ignores decoders)
        shape = tf.shape(image)[:2]
    if not boxed:
        return shape
    top, left, bottom, right = box_pixels(shape, example["bbox"])
    return tf.stack([bottom - top, right - left])


def _size(ds):
    size = int(ds.cardinality())
    return size if size >= 0 else int(ds.reduce(0, lambda count, _: count + 1))
