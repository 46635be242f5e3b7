r"""Writes a TensorFlow Serving model config for exported models, and a sample REST request.

python export/serving_config.py --models=models --output=models/models.config

Every sub-folder of --models that holds integer version folders becomes one model (its name is
the folder name). Also writes `request.json` beside --output: a `predict` body with one black
image of the first model's input shape.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

import json

import tensorflow as tf
from absl import app, flags

from tf_piggyback.cli import user_errors
from tf_piggyback.core.files import write_atomic

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("models", None, "Folder with one exported model base path per sub-folder.")
    flags.DEFINE_string("output", None, "The model_config_list file to write.")
    flags.DEFINE_string("base_path", None, "The models folder as the server sees it (default: --models).")
    for name in ("models", "output"):
        flags.mark_flag_as_required(name)


def model_config_list(models, base_path):
    """`(text of a model_config_list, [(name, newest version path)])` for a folder of models."""
    if not os.path.isdir(models):
        raise ValueError(f"models folder {models!r} does not exist")
    found = []
    for name in sorted(os.listdir(models)):
        versions = [int(v) for v in os.listdir(os.path.join(models, name)) if v.isdigit()] \
            if os.path.isdir(os.path.join(models, name)) else []
        if versions:
            found.append((name, os.path.join(models, name, str(max(versions)))))
    if not found:
        raise ValueError(f"{models!r} has no exported models (sub-folders with integer versions); "
                         "run export/saved_model.py first")
    entries = "".join(
        f"  config {{\n    name: \"{name}\"\n    base_path: \"{os.path.join(base_path, name)}\"\n"
        f"    model_platform: \"tensorflow\"\n  }}\n" for name, _ in found)
    return f"model_config_list {{\n{entries}}}\n", found


@user_errors
def main(argv):
    del argv
    base_path = FLAGS.base_path or os.path.abspath(FLAGS.models)
    text, found = model_config_list(FLAGS.models, base_path)
    write_atomic(FLAGS.output, lambda f: f.write(text.encode()))
    loaded = tf.saved_model.load(found[0][1])
    shape = loaded.signatures["serving_default"].structured_input_signature[1]["image"].shape
    body = {"signature_name": "serving_default",
            "instances": [{"image": [[[0.0] * shape[3]] * shape[2]] * shape[1]}]}
    request = os.path.join(os.path.dirname(os.path.abspath(FLAGS.output)), "request.json")
    write_atomic(request, lambda f: f.write(json.dumps(body).encode()))
    print(f"wrote {FLAGS.output} ({len(found)} models) and {request}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
