r"""Writes an image folder as a TensorFlow Datasets set, for benchmarks of the tfds input.

python scripts/make_tfds_dataset.py --folder=runs/photo4k --name=photo4k_ar --data_dir=runs/tfds \
    --file_format=array_record
TFDS_DATA_DIR=runs/tfds python scripts/bench.py --preset=pipeline --dataset=tfds:photo4k_ar

A tfds set is stored as TFRecord (read in sequence: training can only window-shuffle the part it
streams) or ArrayRecord (random access: every epoch reads it in a fresh order; `sources.tfds_splits`).
This writes either from the same files: FOLDER/train and FOLDER/test, or FOLDER's class
sub-folders with a quarter of each class held out (as `--dataset=folder:FOLDER` splits it), become
the `train` and `test` splits, every image's JPEG bytes stored as they are. The output belongs
under runs/.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import user_errors
from tf_piggyback.data.sources import SPLIT_SEED, folder_files

FLAGS = flags.FLAGS
FORMATS = ("tfrecord", "array_record")


def define_flags():
    flags.DEFINE_string("folder", None, "Image folder: class sub-folders, or train/ and test/ holding them.")
    flags.DEFINE_string("name", None, "The dataset's tfds name (snake_case), e.g. photo4k_ar.")
    flags.DEFINE_string("data_dir", None, "Where tfds keeps it (what TFDS_DATA_DIR names when training).")
    flags.DEFINE_enum("file_format", "array_record", FORMATS, "How tfds stores the records.")
    flags.mark_flags_as_required(["folder", "name", "data_dir"])


def build(folder, name, data_dir, file_format):
    """Writes the set; returns its builder."""
    import tensorflow_datasets as tfds

    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"--name must be a snake_case identifier such as photo4k_ar. Received: {name!r}")
    names, train, test = folder_files(folder, SPLIT_SEED)  # the split train.py makes of the folder
    files = {"train": list(zip(*train)), "test": list(zip(*test))}

    def info(self):
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(names=names)}))

    def split_generators(self, dl_manager):
        return {split: self._generate_examples(entries) for split, entries in files.items()}

    def generate_examples(self, entries):
        for path, label in entries:
            yield str(path), {"image": str(path), "label": int(label)}

    # tfds names a builder after its class (CamelCase -> snake_case).
    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
    builder_class = type(camel, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"), "_info": info, "_split_generators": split_generators,
        "_generate_examples": generate_examples, "__module__": __name__})
    if builder_class.name != name:
        raise ValueError(f"--name {name!r} does not survive tfds' naming ({builder_class.name!r}); use letters, digits "
                         "and single underscores")
    builder = builder_class(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return builder


@user_errors
def main(argv):
    del argv
    builder = build(FLAGS.folder, FLAGS.name, FLAGS.data_dir, FLAGS.file_format)
    print(f"wrote tfds:{FLAGS.name} ({FLAGS.file_format}; {builder.info.splits['train'].num_examples} train, "
          f"{builder.info.splits['test'].num_examples} test images) in {FLAGS.data_dir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
