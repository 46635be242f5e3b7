import os

import numpy as np
import pytest
import tensorflow as tf

from tf_piggyback.data.datasets import load_dataset, load_digits_variant
from tf_piggyback.data.images import fit_image


def test_digits_variants():
    (xb, yb), (xbt, ybt), base_names = load_digits_variant("base")
    (xu, yu), (xut, yut), upper_names = load_digits_variant("upper")
    (xi, yi), (xit, yit), inverted_names = load_digits_variant("inverted")
    assert base_names == ["0", "1", "2", "3", "4"] and upper_names == ["5", "6", "7", "8", "9"]
    assert len(inverted_names) == 10
    for x, y, classes in [(xb, yb, 5), (xu, yu, 5), (xi, yi, 10), (xbt, ybt, 5), (xit, yit, 10)]:
        assert x.shape[1:] == (32, 32, 1) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 255 and set(np.unique(y)) == set(range(classes))
    # inverted = every digit with intensities flipped; the split is the same one.
    (xa, _), (xat, _), _ = load_digits_variant("all")
    np.testing.assert_allclose(xi, 255.0 - xa)
    assert len(xit) == len(xat) == len(xbt) + len(xut)
    # the test split is a quarter of every digit, and the same in every call
    assert abs(len(xbt) / (len(xb) + len(xbt)) - 0.25) < 0.01
    np.testing.assert_array_equal(load_digits_variant("upper")[1][0], xut)


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown digits variant 'lower'"):
        load_digits_variant("lower")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def write_image_folder(root, classes=("five", "six"), per_class=8, corrupt=0):
    """Real PNG files from the digits images, one sub-folder per class."""
    import tensorflow as tf

    (x, y), _, _ = load_digits_variant("upper")
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, image in enumerate(x[y == label][:per_class]):
            rgb = np.repeat(image, 3, axis=-1).astype(np.uint8)
            tf.io.write_file(os.path.join(root, name, f"{i}.png"), tf.io.encode_png(rgb))
        for i in range(corrupt):
            with open(os.path.join(root, name, f"broken{i}.png"), "wb") as f:
                f.write(b"not a png at all")  # skipped when listed
            png = tf.io.encode_png(np.repeat(x[0], 3, axis=-1).astype(np.uint8)).numpy()
            with open(os.path.join(root, name, f"truncated{i}.png"), "wb") as f:
                f.write(png[: len(png) // 2])  # a PNG header: dropped when decoding fails
        with open(os.path.join(root, name, "notes.txt"), "w") as f:
            f.write("not an image; ignored")


def test_folder_dataset_split_and_unreadable_files(tmp_path, caplog):
    root = str(tmp_path / "images")
    write_image_folder(root, per_class=8, corrupt=1)
    splits = load_dataset(f"folder:{root}", image_shape=(32, 32, 1))
    assert "skipped 2 of 20 files that are not images: five/broken0.png, six/broken0.png" in caplog.text
    assert splits.class_names == ["five", "six"]
    assert (splits.train_size, splits.test_size) == (14, 4)  # a quarter of each class's 9 files is test
    train = list(splits.train)
    assert len(train) + len(list(splits.test)) == 16  # the truncated files are dropped with a warning
    image, label = train[0]
    assert image.shape == (32, 32, 1) and image.dtype.name == "float32" and label.dtype.name == "int64"
    assert max(float(np.max(x)) for x, _ in train) > 100  # raw 0-255 pixels


def test_folder_dataset_with_train_and_test(tmp_path):
    root = str(tmp_path / "images")
    write_image_folder(os.path.join(root, "train"), per_class=6)
    write_image_folder(os.path.join(root, "test"), per_class=2)
    splits = load_dataset(f"folder:{root}", image_shape=(40, 40, 3))
    assert (splits.train_size, splits.test_size) == (12, 4)
    assert next(iter(splits.test))[0].shape == (40, 40, 3)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(f"folder:{tmp_path}/missing")
    write_image_folder(str(tmp_path / "one"), classes=("only",))
    with pytest.raises(ValueError, match="has 1 class sub-folder"):
        load_dataset(f"folder:{tmp_path}/one")
    write_image_folder(str(tmp_path / "two"))
    os.makedirs(tmp_path / "two" / "empty")
    with pytest.raises(ValueError, match="class folder\\(s\\) empty hold no images"):
        load_dataset(f"folder:{tmp_path}/two")


def test_channel_counts_that_cannot_be_converted():
    four = tf.data.Dataset.from_tensor_slices((np.zeros((2, 8, 8, 4), np.uint8), np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="images have 4 channels and the backbone takes 3; only grayscale"):
        four.map(lambda x, y: fit_image(x, y, (8, 8, 3)))
    gray = tf.data.Dataset.from_tensor_slices((np.full((2, 8, 8, 1), 7, np.uint8), np.zeros(2, np.int64)))
    rgb, _ = next(iter(gray.map(lambda x, y: fit_image(x, y, (8, 8, 3)))))
    assert rgb.shape == (8, 8, 3) and float(tf.reduce_min(rgb)) == 7.0


def test_tfds_dataset_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from tf_piggyback.training.experiment import RunConfig, run
    from tf_piggyback.training.trainer import TrainConfig

    with tfds.testing.mock_data(num_examples=24):
        splits = load_dataset("tfds:mnist", image_shape=(32, 32, 1))
        assert splits.class_names == [str(i) for i in range(10)]
        image, label = next(iter(splits.train))
        assert image.shape == (32, 32, 1) and 0 <= int(label) < 10
        metrics = run(RunConfig(dataset="tfds:mnist", train=TrainConfig(epochs=1, batch_size=8)),
                      str(tmp_path / "mnist"), log=lambda line: None)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and os.path.exists(tmp_path / "mnist" / "task.npz")
    with pytest.raises(ValueError, match="unknown TensorFlow Datasets name 'no_such_dataset'"):
        load_dataset("tfds:no_such_dataset")


def test_augmentation_is_seeded_so_resumed_epochs_repeat():
    from tf_piggyback.training.trainer import augment, epoch_batches

    image = tf.reshape(tf.range(32 * 32, dtype=tf.float32), (32, 32, 1))
    a, b = augment(image, tf.constant([1, 2], tf.int64)), augment(image, tf.constant([1, 3], tf.int64))
    assert a.shape == (32, 32, 1) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, augment(image, tf.constant([1, 2], tf.int64)))
    examples = load_dataset("digits:upper").train.take(64)
    make = epoch_batches(examples, 16, seed=3, augment_images=True)
    first = [x.numpy() for x, _ in make(1)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate([x.numpy() for x, _ in make(1)]))
    assert not np.array_equal(np.concatenate(first), np.concatenate([x.numpy() for x, _ in make(2)]))
    plain = sorted(float(tf.reduce_sum(x)) for x, _ in examples)
    assert plain != sorted(float(tf.reduce_sum(x)) for batch, _ in make(1) for x in batch)


def test_random_digits_backbone_is_the_same_everywhere():
    from tf_piggyback.core.fingerprint import fingerprint
    from tf_piggyback.training.backbones import load_backbone

    random = load_backbone("digits", "none")
    assert fingerprint(random) == fingerprint(load_backbone("digits", "none"))
    assert fingerprint(random) != fingerprint(load_backbone("digits", "imagenet"))


def test_folder_files_are_interleaved_across_classes_and_train_takes_them(tmp_path):
    """Files are listed class by class; the dataset must not stream them so (a shuffle window
    smaller than the set then sees a few classes per batch, and int8 calibration only the first
    classes), and `pb.train` must take a folder dataset from Python (its size unknown to tf.data)."""
    import tf_piggyback as pb

    root = str(tmp_path / "images")
    write_image_folder(root, classes=("a", "b", "c", "d"), per_class=8)
    splits = load_dataset(f"folder:{root}", image_shape=(32, 32, 1))
    first = [int(label) for _, label in splits.train.take(8)]
    assert len(set(first)) >= 3, first
    again = [int(label) for _, label in load_dataset(f"folder:{root}").train.take(8)]
    assert again == first  # a fixed order: resumed runs repeat their batches
    model = pb.piggyback(pb.digits_backbone(), 4)
    history = pb.train(model, splits.train.batch(8), pb.TrainConfig(epochs=1), log=lambda line: None)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])


def test_held_out_split_does_not_follow_the_training_seed(tmp_path):
    """train.py --seed=1 on a folder without train/ and test/: evaluate.py, in a fresh process,
    scores the very images the run held out (its printed accuracy is the run's own)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    root = str(tmp_path / "images")
    write_image_folder(root, classes=("a", "b", "c"), per_class=12)
    model_dir = str(tmp_path / "run")
    train = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"), "--backbone=digits",
                            f"--dataset=folder:{root}", f"--model_dir={model_dir}", "--epochs=1", "--seed=1",
                            "--verbose=0"], capture_output=True, text=True, cwd=REPO)
    assert train.returncode == 0, train.stderr[-2000:]
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert metrics["config"]["split_seed"] == 0 and metrics["split_seed"] == 0
    evaluate = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--backbone=digits",
                               f"--task={model_dir}/task.npz", f"--dataset=folder:{root}"],
                              capture_output=True, text=True, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert json.loads(evaluate.stdout.strip().splitlines()[-1])["accuracy"] == metrics["accuracy"]


def test_decathlon_evaluates_on_validation_and_refuses_unlabelled_splits():
    """The Visual Decathlon's test labels are private (-1): its tasks are scored on validation,
    and any split whose labels are all negative is refused with one line."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def private_test_labels(self, split=None, *args, as_supervised=False, **kwargs):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (12, 24, 24, 3)).astype(np.uint8)
        labels = (np.full(12, -1) if str(split).startswith("test") else rng.integers(0, 3, 12)).astype(np.int64)
        if as_supervised:
            return tf.data.Dataset.from_tensor_slices((images, labels))
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=private_test_labels):
        splits = load_dataset("tfds:visual_domain_decathlon/aircraft", image_shape=(24, 24, 3))
        labels = [int(y) for _, y in splits.test]
        assert labels and min(labels) >= 0
        with pytest.raises(ValueError, match="split 'test' has no labels"):
            load_dataset("tfds:mnist", image_shape=(24, 24, 3))


def test_cache_keeps_uint8_images_under_a_budget_and_streams_the_rest(tmp_path):
    """A float32 cache of every image does not fit at paper scale (WikiArt: 25 GB): the cache
    holds rounded uint8 pixels, only as many images as the budget takes; the rest stream."""
    root = str(tmp_path / "images")
    write_image_folder(root, classes=("a", "b", "c"), per_class=8)
    shape = (20, 20, 3)
    plain = load_dataset(f"folder:{root}", image_shape=shape)
    budget = 5 * int(np.prod(shape))  # five images
    cached = load_dataset(f"folder:{root}", image_shape=shape, cache_bytes=budget)
    assert cached.train.element_spec[0].dtype.name == "float32"
    expected = [(x.numpy(), int(y)) for x, y in plain.train]
    for _ in range(2):  # the first epoch fills the cache, the second reads it
        got = [(x.numpy(), int(y)) for x, y in cached.train]
        assert [y for _, y in got] == [y for _, y in expected]
        for i, ((x, _), (e, _)) in enumerate(zip(got, expected)):
            if i < 5:
                np.testing.assert_array_equal(x, np.clip(np.round(e), 0, 255))  # stored as uint8
            else:
                np.testing.assert_array_equal(x, e)  # streamed, as read
    with pytest.raises(ValueError, match="cache budget must be >= 0"):
        load_dataset(f"folder:{root}", image_shape=shape, cache_bytes=-1)


def test_pipeline_bench_reports_the_published_keys(tmp_path):
    """`scripts/bench.py --preset=pipeline` over a folder made by scripts/make_image_folder.py."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    folder = tmp_path / "folder"
    made = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_image_folder.py"),
                           f"--output={folder}", "--images=120", "--classes=12", "--size=32", "--test_images=0"],
                          capture_output=True, text=True, cwd=REPO)
    assert made.returncode == 0, made.stderr[-2000:]
    assert len(os.listdir(folder)) == 12
    out = tmp_path / "bench.json"
    bench = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--preset=pipeline",
                            f"--dataset=folder:{folder}", "--image_size=24", "--batch_size=8", f"--output={out}"],
                           capture_output=True, text=True, cwd=REPO)
    assert bench.returncode == 0, bench.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["pipeline_images_per_s"] > 0 and row["pipeline_peak_rss_bytes"] > 0
    assert row["train_size"] == 96 and row["pipeline_classes_per_batch"] >= 5  # 8 draws of 12 classes: ~6.1


def test_a_folder_written_as_an_array_record_tfds_set_feeds_training(tmp_path):
    """`scripts/make_tfds_dataset.py` writes an image folder as a tfds set stored as ArrayRecord
    (random access); another process, where its builder is unknown (a set prepared elsewhere),
    reads it as `tfds:NAME` through `scripts/bench.py --preset=pipeline`, the input train.py builds."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    folder, data_dir = tmp_path / "folder", tmp_path / "tfds"
    made = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_image_folder.py"),
                           f"--output={folder}", "--images=120", "--classes=12", "--size=32", "--test_images=0"],
                          capture_output=True, text=True, cwd=REPO)
    assert made.returncode == 0, made.stderr[-2000:]
    script = os.path.join(REPO, "scripts", "make_tfds_dataset.py")
    written = subprocess.run([sys.executable, script, f"--folder={folder}", "--name=pb_folder_ar",
                              f"--data_dir={data_dir}", "--file_format=array_record"],
                             capture_output=True, text=True, cwd=REPO)
    assert written.returncode == 0 and "96 train, 24 test" in written.stdout, written.stderr[-2000:]
    out = tmp_path / "bench.json"
    bench = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--preset=pipeline",
                            "--dataset=tfds:pb_folder_ar", "--image_size=24", "--batch_size=8", "--cache_mb=0",
                            f"--output={out}"], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "TFDS_DATA_DIR": str(data_dir)})
    assert bench.returncode == 0, bench.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["train_size"] == 96 and row["pipeline_images_per_s"] > 0 and row["pipeline_classes_per_batch"] >= 5
    bad = subprocess.run([sys.executable, script, f"--folder={folder}", "--name=Not-A-Name", f"--data_dir={data_dir}"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "--name must be a snake_case identifier" in bad.stderr


def test_paper_protocol_boxes_flowers_splits_and_crops():
    """--protocol=paper: Cars (and CUBS) cropped to their bounding boxes, Flowers-102 trained on
    train + validation (Table 1's 2,040), training images scaled so the shorter side is 256 (a
    random-sized 224 crop is taken per epoch), test images center-cropped to 224."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from tf_piggyback.training.trainer import epoch_batches

    sizes = {"train": 6, "validation": 4, "test": 5}

    def fake(self, split=None, *args, as_supervised=False, **kwargs):
        import re

        rng = np.random.default_rng(0)
        n = 0
        for part in str(split).split("+"):  # "train", "train+validation", "train[0:6]+validation[0:4]"
            name, low, high = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", part).groups()
            n += (int(high) if high else sizes[name]) - int(low or 0)
        image = np.zeros((n, 100, 300, 3), np.uint8)
        image[:, 20:60, 100:200] = 255  # the object: inside the box, the rest is black
        box = np.tile(np.array([[0.2, 1 / 3, 0.6, 2 / 3]], np.float32), (n, 1))
        labels = rng.integers(0, 3, n).astype(np.int64)
        if as_supervised:
            return tf.data.Dataset.from_tensor_slices((image, labels))
        return tf.data.Dataset.from_tensor_slices({"image": image, "bbox": box, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=fake):
        cars = load_dataset("tfds:cars196", image_shape=(224, 224, 3), protocol="paper")
        image, _ = next(iter(cars.train))
        assert image.shape[0] == 256 and image.shape[1] == 640 and float(tf.reduce_min(image)) > 250  # the box only
        test_image, _ = next(iter(cars.test))
        assert test_image.shape == (224, 224, 3)
        plain = load_dataset("tfds:cars196", image_shape=(224, 224, 3))
        assert float(tf.reduce_min(next(iter(plain.train))[0])) == 0.0  # the simple protocol keeps the frame
        flowers = load_dataset("tfds:oxford_flowers102", image_shape=(224, 224, 3), protocol="paper")
        assert flowers.train_size == sizes["train"] + sizes["validation"] and flowers.test_size == sizes["test"]
        cars = load_dataset("tfds:cars196", image_shape=(224, 224, 3), protocol="paper", cache_bytes=2 * 256 * 640 * 3)
        batches = epoch_batches(cars.epoch, 2)  # the cached images' crops and the streamed ones'
        first, again = [next(iter(batches(1)))[0].numpy() for _ in range(2)]
        assert first.shape == (2, 224, 224, 3) and np.array_equal(first, again)  # seeded: resumes repeat
    with pytest.raises(ValueError, match="protocol must be one of simple, paper"):
        load_dataset("digits:upper", protocol="official")


def test_int8_calibration_images_span_the_classes(tmp_path, monkeypatch):
    """The int8 representative set is the first training images: for a folder they came from
    the first classes only; now they are drawn across classes."""
    import tensorflow as tf

    from tf_piggyback.devices import tflite

    root = tmp_path / "images"
    for label in range(3):
        os.makedirs(root / f"c{label}")
        for i in range(12):
            pixels = np.full((8, 8, 3), 40 + 80 * label, np.uint8)  # the class is the pixel value
            tf.io.write_file(str(root / f"c{label}" / f"{i}.png"), tf.io.encode_png(pixels))
    monkeypatch.setattr(tflite, "REPRESENTATIVE_SAMPLES", 6)
    images = tflite.representative_images(f"folder:{root}", (8, 8, 3))
    assert len(images) == 6 and len({int(x.mean()) for x in images}) >= 2


def _numbered_folder(root, count, classes=10):
    """A folder of `count` 8x8 PNGs whose pixels spell each image's number (lossless)."""
    for i in range(count):
        folder = os.path.join(root, f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        tf.io.write_file(os.path.join(folder, f"{i:05d}.png"), tf.io.encode_png(_numbered_image(i)))


def _numbered_image(i):
    """An 8x8 image whose pixels spell its number `i` (lossless as PNG)."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1] = i // 256, i % 256
    return image


def _numbered_ids(images):
    """The numbers that `_numbered_image`s spell."""
    return (images[:, 0, 0, 0] * 256 + images[:, 0, 0, 1]).astype(int)


def _numbered_tfds(data_dir, count):
    """A real TensorFlow Datasets set stored as ArrayRecord (random access; what `tfds build
    --file_format=array_record` writes): `count` numbered training images in 10 classes."""
    import tensorflow_datasets as tfds

    class PbNumberedImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=10)}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, count), "test": self._generate_examples(count, 20)}

        def _generate_examples(self, start, size):
            for i in range(start, start + size):
                yield i, {"image": _numbered_image(i), "label": i % 10}

    PbNumberedImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "pb_numbered_images"


@pytest.mark.parametrize("spec", ["folder", "digits", "tfds"])
def test_every_epoch_visits_the_images_in_a_fresh_order(tmp_path, spec, monkeypatch):
    """With a cache smaller than the set and a shuffle window smaller than the set, an image's
    place in one epoch says nothing of its place in the next (|rank correlation| < 0.1); each
    epoch visits every image once; a resumed run repeats an epoch's batches; batches span as
    many classes as a full shuffle gives. A tfds set stored as TFRecord can only stream in its
    stored order (window-shuffled); stored as ArrayRecord, it is read in a fresh order."""
    from tf_piggyback.training.trainer import epoch_batches

    if spec == "folder":
        root = str(tmp_path / "numbered")
        _numbered_folder(root, 900)
        splits = load_dataset(f"folder:{root}", image_shape=(8, 8, 3), cache_bytes=300 * 8 * 8 * 3)
        ids = _numbered_ids
    elif spec == "tfds":
        import tensorflow_datasets as tfds

        # where `tfds.builder` looks (TFDS_DATA_DIR is read once, when tfds is imported)
        monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "tfds"))
        name = _numbered_tfds(str(tmp_path / "tfds"), 900)
        splits = load_dataset(f"tfds:{name}", image_shape=(8, 8, 3), cache_bytes=300 * 8 * 8 * 3)
        ids = _numbered_ids
        # the paper protocol reads the streamed part's JPEG/PNG bytes (decode_and_crop) by index too
        paper = load_dataset(f"tfds:{name}", image_shape=(8, 8, 3), cache_bytes=300 * 9 * 9 * 3, protocol="paper")
        assert 0 < paper.cached < 900 and sum(1 for _ in paper.epoch(1)) == 900 and paper.test_size == 20
    else:  # every digits image is told apart by its pixels
        splits = load_dataset("digits:all", image_shape=(32, 32, 1), cache_bytes=300 * 32 * 32)
        first = np.stack([x.numpy() for x, _ in splits.train])
        lookup = {first[i].tobytes(): i for i in range(len(first))}
        assert len(lookup) == len(first)

        def ids(images):
            return np.array([lookup[image.tobytes()] for image in images])

    make = epoch_batches(splits.epoch, 32, seed=3, buffer_size=64)
    orders, classes = [], []
    for epoch in (0, 1, 1):
        order = []
        for images, labels in make(epoch):
            order.extend(ids(images.numpy()))
            if len(labels) == 32:  # a full batch (the epoch's last is not)
                classes.append(len(set(labels.numpy().tolist())))
        orders.append(np.array(order))
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == len(orders[0]) == splits.train_size
    np.testing.assert_array_equal(orders[1], orders[2])  # seeded by (seed, epoch)
    place = [np.argsort(order) for order in orders[:2]]  # image -> its place in the epoch
    assert abs(np.corrcoef(place[0], place[1])[0, 1]) < 0.1
    full = 10 * (1 - 0.9 ** 32)  # expected classes in 32 draws from 10 equally frequent ones
    assert np.mean(classes) > full - 0.3


def test_tfds_cache_and_stream_split_by_record_for_combined_splits():
    """Flowers-102 under --protocol=paper trains on train+validation: the cached part and the
    streamed rest are tfds slices by record that neither overlap nor miss one (a `skip` re-read
    the cached part every epoch), and every epoch visits each image once."""
    import re

    import tensorflow_datasets as tfds

    sizes = {"train": 6, "validation": 4, "test": 5}
    offsets = {"train": 0, "validation": 100, "test": 200}
    asked = []

    def fake(self, split=None, *args, as_supervised=False, **kwargs):
        records = []
        for part in str(split).split("+"):
            name, low, high = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", part).groups()
            records += [offsets[name] + i for i in range(int(low or 0), int(high) if high else sizes[name])]
        asked.append(str(split))
        images = np.broadcast_to(np.array(records, np.uint8)[:, None, None, None], (len(records), 12, 12, 3))
        labels = np.zeros(len(records), np.int64)
        if as_supervised:
            return tf.data.Dataset.from_tensor_slices((images.copy(), labels))
        return tf.data.Dataset.from_tensor_slices({"image": images.copy(), "label": labels})

    shape = (8, 8, 3)
    with tfds.testing.mock_data(as_dataset_fn=fake):
        side = round(8 * 256 / 224)
        splits = load_dataset("tfds:oxford_flowers102", image_shape=shape, protocol="paper",
                              cache_bytes=7 * side * side * 3)
        assert "train[0:6]+validation[0:1]" in asked and "validation[1:4]" in asked
        for seed in (1, 2):
            seen = sorted(int(round(float(x[0, 0, 0]))) for x, _ in splits.epoch(seed))
            assert seen == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103]


def test_paper_cache_counts_each_images_own_bytes(tmp_path):
    """Under --protocol=paper an image keeps its aspect ratio (shorter side 256/224 of the input),
    so a 2:1 image takes twice a square one's bytes. The cache budget counts each image's own
    bytes, from its header (folders) or its record's header and box (tfds); it counted every image
    as a square, so a set of 2:1 images took twice the budget. The shuffle window holds each
    epoch's crops, of the input's size, whatever the images' shapes."""
    import tensorflow_datasets as tfds

    from tf_piggyback.data.datasets import scaled_bytes

    root = tmp_path / "wide"
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / f"class{c}")
        for i in range(6):
            size = (20, 40) if i % 2 else (20, 20)  # 2:1 and square, alternating
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            tf.io.write_file(str(root / f"class{c}" / f"{i}.png"), tf.io.encode_png(pixels))
    shape, side = (8, 8, 3), 9  # side: round(8 * 256 / 224)
    square = side * side * 3
    budget = 6 * square  # six squares' worth
    splits = load_dataset(f"folder:{root}", image_shape=shape, protocol="paper", cache_bytes=budget)
    stored = [int(np.prod(x.shape)) for x, _ in splits.train]  # the cached first, in order
    assert 0 < splits.cached < 6  # the old count: budget // square = 6 whatever their shapes
    assert sum(stored[:splits.cached]) <= budget < sum(stored[:splits.cached + 1])
    assert max(stored) == 2 * square and min(stored) == square
    assert splits.epoch(0).element_spec[0].shape == shape
    assert list(scaled_bytes([[20, 40], [40, 20], [0, 0]], side, 3)) == [2 * square, 2 * square, 0]

    def boxed_cars(self, split=None, *args, as_supervised=False, **kwargs):
        n = 12 if str(split).startswith("train") else 3
        image = np.zeros((n, 100, 300, 3), np.uint8)
        box = np.tile(np.array([[0.2, 0.0, 0.6, 1.0]], np.float32), (n, 1))  # 40x300: 7.5 to 1
        labels = np.zeros(n, np.int64)
        return tf.data.Dataset.from_tensor_slices({"image": image, "bbox": box, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=boxed_cars):
        cars = load_dataset("tfds:cars196", image_shape=shape, protocol="paper", cache_bytes=budget)
    wide = int(scaled_bytes([[40, 300]], side, 3)[0])
    assert cars.cached == budget // wide


def test_paper_crops_decode_only_their_window_and_repeat_per_seed(tmp_path):
    """--protocol=paper: a streamed JPEG's random-sized crop decodes only its window
    (tf.io.decode_and_crop_jpeg) and equals the crop of the image decoded whole, inside a tfds
    box too; a PNG takes the same crop; an epoch's crops are seeded by (seed, place), cached
    images' and streamed ones' alike, so a resumed run repeats them."""
    from tf_piggyback.data.images import box_pixels, decode_random_sized_crop, random_sized_crop

    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # 60x80
    # 4:4:4: with 4:2:0 chroma, the window's edge pixels upsample their colour from inside it only
    jpeg, png = tf.io.encode_jpeg(pixels, quality=95, chroma_downsampling=False), tf.io.encode_png(pixels)
    decoded = tf.cast(tf.io.decode_jpeg(jpeg), tf.float32)
    box = tf.constant([0.1, 0.2, 0.9, 1.0])
    top, left, bottom, right = box_pixels(tf.shape(decoded)[:2], box)
    for i in range(5):
        key = tf.constant([3, i], tf.int64)
        whole = random_sized_crop(decoded[top:bottom, left:right], key, (16, 16, 3))
        np.testing.assert_allclose(decode_random_sized_crop(jpeg, box, key, (16, 16, 3)), whole, atol=1e-3)
        np.testing.assert_allclose(decode_random_sized_crop(png, box, key, (16, 16, 3)),
                                   random_sized_crop(tf.cast(pixels, tf.float32)[top:bottom, left:right], key,
                                                     (16, 16, 3)), atol=1e-3)
    root = tmp_path / "photos"
    for c in range(3):
        os.makedirs(root / f"class{c}")
        for i in range(5):
            tf.io.write_file(str(root / f"class{c}" / f"{i}.jpg"),
                             tf.io.encode_jpeg(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)))
    splits = load_dataset(f"folder:{root}", image_shape=(16, 16, 3), protocol="paper", cache_bytes=4 * 18 * 24 * 3)
    assert 0 < splits.cached < splits.train_size  # both parts
    epochs = [np.stack([x.numpy() for x, _ in splits.epoch(seed)]) for seed in (7, 7, 8)]
    assert epochs[0].shape == (splits.train_size, 16, 16, 3)
    np.testing.assert_array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], epochs[2])
