r"""Exports task files as a SavedModel in TensorFlow Serving's layout: OUTPUT/<version>/ (BUILD.md, "Interfaces").

python export/saved_model.py --backbone=digits --task=runs/demo/upper/piggyback/task.npz \
    --output=models/digits
python export/saved_model.py --backbone=digits --task=A.npz --task=B.npz --output=models/multi

One task: the mask is baked into plain layers. Several: one shared backbone traced once, packed
masks, --slots unpacked working copies, one signature per task (named after the task file's
folder; `serving_default` is the first task) and `tasks` / `tasks_by_name`, which take `image`
and one task per example. `export/list_tasks.py` lists what an export holds.

python export/saved_model.py --backbone=PRESET_DIR --task=A.npz --task=B.npz --output=models/text \
    --text_signatures   # a keras-hub text preset: text and tasks_text take strings too
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import backbone_from_flags, define_backbone_flags, user_errors
from tf_piggyback.data.text import is_preset, load_preset
from tf_piggyback.serving.saved_model import export_saved_model
from tf_piggyback.serving.taskbank import DEFAULT_SLOTS

FLAGS = flags.FLAGS


def define_flags():
    define_backbone_flags()
    flags.DEFINE_multi_string("task", None, "Task file(s), PATH or NAME=PATH; repeat for a multi-task model.")
    flags.DEFINE_string("output", None, "Model base path; the version goes in OUTPUT/<version>/.")
    flags.DEFINE_integer("version", None, "Integer version; default the next free one.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing version (TF Serving never reloads a version number it "
                      "has loaded: export the next version instead; a warning says so).")
    flags.DEFINE_integer("slots", DEFAULT_SLOTS, "Several tasks: how many tasks' masked kernels stay unpacked "
                         "at once (each a float copy of the kernels); others unpack when called (tens of ms).")
    flags.DEFINE_bool("per_task_signatures", True, "Several tasks: a signature per task besides serving_default, "
                      "tasks and tasks_by_name. Each costs load time and memory in TensorFlow (ResNet-50, 100 tasks: "
                      "1.7 s instead of 0.55 s to load); with many tasks, serve them through `tasks`.")
    flags.DEFINE_bool("text_signatures", False, "A keras-hub text preset (--backbone=PRESET): signatures that take "
                      "strings too, its preprocessor inside (text; tasks_text for several tasks). Loading them needs "
                      "TF Text's ops: `import tensorflow_text` first.")
    flags.DEFINE_integer("sequence_length", None, "--text_signatures: tokens per example (default: the preset's).")
    for name in ("task", "output"):
        flags.mark_flag_as_required(name)


@user_errors
def main(argv):
    del argv
    preprocessor = None
    if FLAGS.text_signatures:
        if not is_preset(FLAGS.backbone):
            raise ValueError(f"--text_signatures takes a keras-hub text preset's preprocessor; pass --backbone=PRESET. "
                             f"Received: --backbone={FLAGS.backbone}")
        backbone, preprocessor = load_preset(FLAGS.backbone, FLAGS.sequence_length)
        if preprocessor is None:
            raise ValueError(f"--text_signatures: {FLAGS.backbone} is an image preset")
    else:
        backbone = backbone_from_flags()
    path = export_saved_model(backbone, FLAGS.task, FLAGS.output, FLAGS.version, FLAGS.overwrite, FLAGS.slots,
                              FLAGS.per_task_signatures, preprocessor)
    print(path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
