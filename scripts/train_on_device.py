r"""Trains an on-device model (export/ondevice.py) with the LiteRT interpreter, as an app would.

python scripts/train_on_device.py --model=ondevice/ --backbone=digits --dataset=digits:upper \
    --epochs=5 --task=ondevice/task.npz

Prints loss and test accuracy per epoch and writes what the device learned as an ordinary task
file, which load_task and the export CLIs accept like any other.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

import time

import numpy as np
from absl import app, flags

from tf_piggyback.cli import backbone_from_flags, define_backbone_flags, user_errors
from tf_piggyback.data.datasets import load_dataset, to_arrays
from tf_piggyback.devices.ondevice import LiteRTTrainer

FLAGS = flags.FLAGS


def define_flags():
    define_backbone_flags()
    flags.DEFINE_string("model", None, "The folder export/ondevice.py wrote.")
    flags.DEFINE_string("dataset", None, "digits:VARIANT, tfds:NAME[/CONFIG] or folder:PATH.")
    flags.DEFINE_integer("epochs", 5, "Passes over the training set.")
    flags.DEFINE_integer("seed", 0, "Seed of the batch order.")
    flags.DEFINE_string("task", None, "The task file to write (default MODEL/task.npz).")
    for name in ("model", "dataset"):
        flags.mark_flag_as_required(name)


@user_errors
def main(argv):
    del argv
    if FLAGS.epochs <= 0:
        raise ValueError(f"--epochs must be > 0. Received: {FLAGS.epochs}")
    trainer = LiteRTTrainer(FLAGS.model)
    backbone = backbone_from_flags()
    # The default held-out split, as train.py and evaluate.py use it; --seed orders batches only.
    splits = load_dataset(FLAGS.dataset, image_shape=trainer.config["image_size"])
    if len(splits.class_names) != trainer.config["num_classes"]:
        raise ValueError(f"{FLAGS.dataset} has {len(splits.class_names)} classes; the on-device model was exported "
                         f"for {trainer.config['num_classes']} (--num_classes)")
    x, y = to_arrays(splits.train)
    xt, yt = to_arrays(splits.test)
    rng = np.random.default_rng(FLAGS.seed)
    for epoch in range(FLAGS.epochs):
        start = time.time()
        loss = trainer.train_epoch(x, y, rng)
        accuracy = trainer.accuracy(xt, yt)
        print(f"epoch {epoch + 1}/{FLAGS.epochs}  loss {loss:.4f}  test accuracy {accuracy:.4f}  "
              f"({time.time() - start:.1f}s)", flush=True)
    path = FLAGS.task or f"{FLAGS.model.rstrip('/')}/task.npz"
    trainer.save_task(backbone, path, class_names=splits.class_names, metrics={"accuracy": accuracy})
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
