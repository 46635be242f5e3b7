r"""Exports a LiteRT model that learns a new task on the device: masks and head, weights frozen (§7).

python export/ondevice.py --backbone=digits --num_classes=5 --batch_size=32 --output=ondevice/

Writes DIR/model.tflite (signatures train(image, label) -> loss, infer(image) -> logits,
probabilities, export_task() -> packed masks and head, reset()) with TFLite builtins only, and
DIR/ondevice.json. Train it with scripts/train_on_device.py, or from an app.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import backbone_from_flags, define_backbone_flags, user_errors
from tf_piggyback.core.binarizers import DEFAULT_THRESHOLD
from tf_piggyback.core.layers import DEFAULT_MASK_SCALE
from tf_piggyback.devices.ondevice import OPTIMIZERS, export_ondevice

FLAGS = flags.FLAGS


def define_flags():
    define_backbone_flags()
    flags.DEFINE_integer("num_classes", None, "Classes of the task to learn on the device.")
    flags.DEFINE_integer("batch_size", 32, "The train signature's (static) batch size.")
    flags.DEFINE_enum("optimizer", "adam", OPTIMIZERS, "adam (as in §4) or sgd (momentum 0.9).")
    flags.DEFINE_float("mask_lr", 1e-4, "Learning rate of the masks (paper: 1e-4).")
    flags.DEFINE_float("head_lr", 1e-3, "Learning rate of the head.")
    flags.DEFINE_float("threshold", DEFAULT_THRESHOLD, "Mask threshold tau (paper: 5e-3).")
    flags.DEFINE_float("mask_scale", DEFAULT_MASK_SCALE, "Initial value of the real-valued masks (paper: 1e-2).")
    flags.DEFINE_string("mask_from", None, "Learn masks only from this backbone layer on (as train.py's "
                        "--mask_from): the layers before it run forward only, a faster step with less memory.")
    flags.DEFINE_string("output", None, "Folder for model.tflite and ondevice.json.")
    for name in ("num_classes", "output"):
        flags.mark_flag_as_required(name)


@user_errors
def main(argv):
    del argv
    size = export_ondevice(backbone_from_flags(), FLAGS.num_classes, FLAGS.batch_size, FLAGS.output,
                           optimizer=FLAGS.optimizer, mask_lr=FLAGS.mask_lr, head_lr=FLAGS.head_lr,
                           threshold=FLAGS.threshold, mask_scale=FLAGS.mask_scale, mask_from=FLAGS.mask_from)
    print(f"{FLAGS.output}/model.tflite: {size:,} bytes")


if __name__ == "__main__":
    define_flags()
    app.run(main)
