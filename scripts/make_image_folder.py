r"""Writes a synthetic image folder (one sub-folder per class) for benchmarks at paper scale.

python scripts/make_image_folder.py --output=runs/wikiart_like   # train/: 42,000 JPEGs, test/: 10,628

The default is the size of WikiArt in the paper's Table 1 (195 classes, 256 px images): OUTPUT/train
and OUTPUT/test, one sub-folder per class in each (--test_images=0: one folder, split by
train.py). Each image is noise around a per-class colour, so the folder is cheap to make and its
classes are real labels; blocky noise decodes far faster than photographs. `--photo_like` makes
images that decode as photographs do: 500x375 (CUBS' and WikiArt's usual size), fine-grained
texture at several scales over smooth shading, 50-150 KB as JPEG at quality 90, as those
datasets' files are. The output belongs under runs/ (ignored by git).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs


import numpy as np
from absl import app, flags

from tf_piggyback.cli import user_errors

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("output", None, "Folder to write (class sub-folders inside).")
    flags.DEFINE_integer("images", 42_000, "Training images (all images with --test_images=0).")
    flags.DEFINE_integer("test_images", 10_628, "Test images, in OUTPUT/test (0: no train/ and test/ folders).")
    flags.DEFINE_integer("classes", 195, "Class sub-folders.")
    flags.DEFINE_integer("size", 256, "Image height and width (blocky images).")
    flags.DEFINE_bool("photo_like", False, "500x375 images with photo-like texture, 50-150 KB each.")
    flags.mark_flag_as_required("output")


def photo_like(rng, colour, height=375, width=500):
    """A 500x375 image around `colour`: smooth shading, texture at 2, 8 and 32 px scales, and
    fine grain, so its JPEG is as large and as slow to decode as a photograph's."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    a, b, c = rng.uniform(-1, 1, 3)
    image = np.repeat((60 * (a * x + b * y + c * x * y))[..., None], 3, axis=-1) + colour
    for scale, amplitude in ((32, 30), (8, 20), (2, 12)):
        coarse = rng.normal(0, amplitude, (-(-height // scale), -(-width // scale), 3))
        image += np.kron(coarse, np.ones((scale, scale, 1)))[:height, :width]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@user_errors
def main(argv):
    del argv
    import tensorflow as tf

    if FLAGS.images < FLAGS.classes or FLAGS.classes < 2 or FLAGS.size < 8:
        raise ValueError("need --classes >= 2, --images >= --classes and --size >= 8")
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (FLAGS.classes, 3))
    parts = [("train", FLAGS.images), ("test", FLAGS.test_images)] if FLAGS.test_images > 0 else [("", FLAGS.images)]
    written = 0
    for part, count in parts:
        for i in range(count):
            label = i % FLAGS.classes
            path = os.path.join(FLAGS.output, part, f"class_{label:03d}", f"{i:06d}.jpg")
            if os.path.exists(path):
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if FLAGS.photo_like:
                image = photo_like(rng, colours[label])
            else:
                noise = rng.normal(0, 40, (FLAGS.size // 8, FLAGS.size // 8, 3))
                image = np.clip(np.kron(noise, np.ones((8, 8, 1))) + colours[label], 0, 255).astype(np.uint8)
            tf.io.write_file(path + ".tmp", tf.io.encode_jpeg(image, quality=90))
            os.replace(path + ".tmp", path)
            written += 1
    counts = ", ".join(f"{part or 'all'} {count:,}" for part, count in parts)
    print(f"{FLAGS.output}: {counts} images in {FLAGS.classes} classes ({written:,} written now)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
