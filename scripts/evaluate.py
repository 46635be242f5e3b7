r"""Evaluates a task file on a dataset's test split; prints one JSON line.

python scripts/evaluate.py --backbone=digits --task=runs/demo/upper/piggyback/task.npz \
    --dataset=digits:upper
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

import json

from absl import app, flags

import tf_piggyback as pb
from tf_piggyback.cli import backbone_from_flags, define_backbone_flags, user_errors
from tf_piggyback.data.datasets import PROTOCOLS, SPLIT_SEED
from tf_piggyback.data.text import is_preset, load_preset, text_splits
from tf_piggyback.training.evaluation import test_metrics

FLAGS = flags.FLAGS


def define_flags():
    define_backbone_flags()
    flags.DEFINE_string("task", None, "A task file written by training (task.npz).")
    flags.DEFINE_string("dataset", None, "Dataset spec, e.g. digits:upper.")
    flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")
    flags.DEFINE_integer("split_seed", None, "Held-out split seed of a folder: dataset without train/ and test/ "
                         "(default: the one the task was trained with, from its manifest).")
    flags.DEFINE_enum("protocol", None, PROTOCOLS, "Test-image handling (default: the task's, from its manifest).")
    for name in ("task", "dataset"):
        flags.mark_flag_as_required(name)


@user_errors
def main(argv):
    del argv
    backbone, preprocessor = load_preset(FLAGS.backbone) if is_preset(FLAGS.backbone) else (backbone_from_flags(), None)
    model = pb.load_task(FLAGS.task, backbone)
    recorded = model.manifest["metrics"]  # how the task was trained and held out its test images
    split_seed = recorded.get("split_seed", SPLIT_SEED) if FLAGS.split_seed is None else FLAGS.split_seed
    protocol = recorded.get("protocol", "simple") if FLAGS.protocol is None else FLAGS.protocol
    if preprocessor is not None:  # a text preset: the test texts tokenized as in training
        preprocessor.sequence_length = recorded.get("sequence_length", preprocessor.sequence_length)
        splits = text_splits(FLAGS.dataset, preprocessor, list(backbone.input), split_seed)
    else:
        splits = pb.load_dataset(FLAGS.dataset, image_shape=backbone.inputs[0].shape[1:], split_seed=split_seed,
                                 protocol=protocol)
    print(json.dumps({"task": FLAGS.task, "dataset": FLAGS.dataset,
                      **test_metrics(model, splits, batch_size=FLAGS.batch_size), "examples": splits.test_size}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
