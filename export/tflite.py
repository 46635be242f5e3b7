r"""Exports task files as one TFLite / LiteRT model (BUILD.md, "Interfaces").

python export/tflite.py --backbone=digits --task=runs/demo/upper/piggyback/task.npz \
    --output=upper.tflite --quantize=int8 --representative=digits:upper

Several --task give one signature per task (the backbone stored once, masks packed); a single
task gives `serving_default`; each call of a task unpacks its masks. Run it with
`ai_edge_litert.interpreter.Interpreter(model_path=F).get_signature_runner(NAME)(image=x)`.

`--phone` writes the phone form instead: one constant-filter model of the backbone and a table of
where each task's masked filters sit in the bytes; `tf_piggyback.devices.phone.PhoneTasks(F).task(NAME)(image=x)`
rebuilds the interpreter from patched bytes on a switch, then runs at the single-task file's speed.
`--phone --quantize=int8 --representative=digits:upper` quantizes the backbone's filters once and
calibrates each task's activations on its own model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import backbone_from_flags, define_backbone_flags, user_errors
from tf_piggyback.devices.phone import export_phone
from tf_piggyback.devices.tflite import QUANTIZATIONS, export_tflite, representative_images

FLAGS = flags.FLAGS


def define_flags():
    define_backbone_flags()
    flags.DEFINE_multi_string("task", None, "Task file(s), PATH or NAME=PATH; repeat for one signature per task.")
    flags.DEFINE_string("output", None, "The .tflite file to write.")
    flags.DEFINE_enum("quantize", "none", QUANTIZATIONS, "none (float32), float16, or int8 (full integer).")
    flags.DEFINE_string("representative", None, "For int8: a dataset spec whose training images calibrate.")
    flags.DEFINE_bool("phone", False, "Write the phone form (tf_piggyback.devices.phone): the tasks run at the single-task "
                      "file's speed; switching rebuilds the interpreter from patched bytes. float32, float16 or "
                      "int8 (with --representative: each task's activations calibrated on it).")
    flags.DEFINE_string("int8_cache", None, "--phone --quantize=int8: a folder that keeps each task's int8 model, so "
                        "a file with one more task makes that task's alone.")
    for name in ("task", "output"):
        flags.mark_flag_as_required(name)


@user_errors
def main(argv):
    del argv
    backbone = backbone_from_flags()
    representative = None
    if FLAGS.representative:
        representative = representative_images(FLAGS.representative, backbone.inputs[0].shape[1:])
    if FLAGS.int8_cache and not FLAGS.phone:
        raise ValueError(f"--int8_cache keeps a phone file's int8 tasks: add --phone. "
                         f"Received: --int8_cache={FLAGS.int8_cache}")
    if FLAGS.phone:
        size = export_phone(backbone, FLAGS.task, FLAGS.output, FLAGS.quantize, representative, FLAGS.int8_cache)
    else:
        size = export_tflite(backbone, FLAGS.task, FLAGS.output, FLAGS.quantize, representative)
    print(f"{FLAGS.output}: {size:,} bytes")


if __name__ == "__main__":
    define_flags()
    app.run(main)
