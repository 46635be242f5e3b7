"""What every absl driver shares: user mistakes end in one line and a non-zero exit."""

import functools
import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _message(error):
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename!s}; check the path and its permissions"
    return str(error)


def user_errors(main):
    """Wraps an absl `main` so a user error prints `error: ...` and exits 2, without traceback.

    Set `TF_PIGGYBACK_DEBUG=1` to see the traceback instead.
    """

    @functools.wraps(main)
    def wrapped(argv):
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("TF_PIGGYBACK_DEBUG"):
                raise
            print(f"error: {_message(e)}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def define_backbone_flags():
    """`--backbone`, `--weights`, `--image_size`: the flags every driver names its backbone with."""
    flags.DEFINE_string("backbone", None, "digits, digits_vit, a keras.applications name (e.g. ResNet50), a .keras file, "
                        "or a keras-hub preset: a kaggle:// or hf:// handle, or a folder save_to_preset wrote.")
    flags.DEFINE_string("weights", "imagenet", "keras.applications weights: imagenet, none, or a weights file.")
    flags.DEFINE_integer("image_size", None, "keras.applications input height and width (default 224).")
    flags.mark_flag_as_required("backbone")


def backbone_from_flags():
    from tf_piggyback.training.backbones import load_backbone

    return load_backbone(flags.FLAGS.backbone, flags.FLAGS.weights, flags.FLAGS.image_size)
