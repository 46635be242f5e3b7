import os

import numpy as np
import pytest

from tf_piggyback.datasets import load_dataset, load_digits_variant


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
                f.write(b"not a png at all")
        with open(os.path.join(root, name, "notes.txt"), "w") as f:
            f.write("not an image; ignored")


def test_folder_dataset_split_and_unreadable_files(tmp_path):
    root = str(tmp_path / "images")
    write_image_folder(root, per_class=8, corrupt=1)
    splits = load_dataset(f"folder:{root}", image_shape=(32, 32, 1))
    assert splits.class_names == ["five", "six"]
    assert (splits.train_size, splits.test_size) == (14, 4)  # a quarter of each class is test
    train = list(splits.train)
    assert len(train) + len(list(splits.test)) == 16  # the two broken files are skipped with a warning
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


def test_tfds_dataset_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from tf_piggyback.experiment import RunConfig, run
    from tf_piggyback.trainer import TrainConfig

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
