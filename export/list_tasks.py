r"""Lists the tasks inside an exported model: a SavedModel version folder or a .tflite file.

python export/list_tasks.py --model=models/multi/1
python export/list_tasks.py --model=multi.tflite --json

A SavedModel shows each task's name, classes, mask sparsity and the SHA-256 of the task file it
was exported from; a TFLite file its signatures and class counts.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

import json

from absl import app, flags

from tf_piggyback.cli import user_errors
from tf_piggyback.serving.saved_model import list_tasks

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model", None, "A SavedModel version folder (OUTPUT/<N>) or a .tflite file.")
    flags.DEFINE_bool("json", False, "Print the listing as JSON.")
    flags.mark_flag_as_required("model")


@user_errors
def main(argv):
    del argv
    listing = list_tasks(FLAGS.model)
    if FLAGS.json:
        print(json.dumps(listing, indent=1))
        return
    if "backbone" in listing:
        print(f"backbone {listing['backbone']['name']} (fingerprint {listing['backbone']['fingerprint'][:12]}), "
              f"{listing['slots']} working slots")
    print("name\tclasses\tmethod\tsparsity\ttask file sha256")
    for task in listing["tasks"]:
        sparsity = f"{task['sparsity']:.3f}" if "sparsity" in task else ""
        print(f"{task['name']}\t{task['num_classes']}\t{task.get('method', '')}\t{sparsity}\t"
              f"{task.get('source_sha256', '')[:16]}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
