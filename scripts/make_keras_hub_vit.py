r"""Writes a small keras-hub `ViTBackbone` as a `.keras` file, pretrained on digits 0-4 like the embedded
digits CNN and ViT (`backbones.pretrain_digits_backbone`), or random (`--epochs=0`).

python scripts/make_keras_hub_vit.py --output=runs/khvit/vit_digits.keras
python scripts/train.py --backbone=runs/khvit/vit_digits.keras --dataset=digits:upper --head_lr=1e-3

Presets need downloads, so the backbone is built from its config: 32x32x1 images, 8x8 patches, 2
encoder blocks of 2 heads, hidden size 32, MLP 64: 13 kernels (`tests/test_keras_hub.py`'s
`vit_backbone()` with one channel, as the digits are). README's choose-a-method table has its rows. The output
belongs under runs/ (ignored by git).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import user_errors

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("output", None, "The `.keras` file to write.")
    flags.DEFINE_integer("epochs", 30, "Epochs on digits:base (0: random weights, seeded).")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and of pretraining.")
    flags.mark_flag_as_required("output")


def build():
    import keras_hub

    from tf_piggyback.data.datasets import DIGITS_IMAGE_SIZE

    return keras_hub.models.ViTBackbone(image_shape=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 1), patch_size=8,
                                        num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


@user_errors
def main(argv):
    del argv
    import keras

    from tf_piggyback.training.backbones import pretrain_digits_backbone

    if not FLAGS.output.endswith(".keras"):
        raise ValueError(f"--output must end in .keras. Received: --output={FLAGS.output}")
    if FLAGS.epochs:
        backbone, _ = pretrain_digits_backbone(FLAGS.epochs, FLAGS.seed, build=build)
    else:
        keras.utils.set_random_seed(FLAGS.seed)
        backbone = build()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    temporary = FLAGS.output + ".tmp.keras"
    backbone.save(temporary)
    os.replace(temporary, FLAGS.output)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
