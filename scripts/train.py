r"""Learns one task over a frozen backbone and writes it to --model_dir (BUILD.md, "Interfaces").

python scripts/train.py --backbone=digits --dataset=digits:upper --model_dir=runs/upper
python scripts/train.py --backbone=ResNet50 --weights=imagenet --dataset=tfds:oxford_flowers102 \
    --model_dir=runs/flowers --strategy=mirrored

python scripts/train.py --backbone=kaggle://keras/bert/keras/bert_tiny_en_uncased --feature_layer=sequence_output \
    --dataset=tfds:imdb_reviews --sequence_length=128 --model_dir=runs/imdb   # a keras-hub text preset

python scripts/train.py --backbone=digits --dataset=digits:upper --method=packnet --model_dir=runs/p1
python scripts/train.py --backbone=digits --dataset=digits:inverted --method=packnet \
    --packnet_base=runs/p1 --model_dir=runs/p2           # PackNet: tasks are added in order

Writes task.npz (piggyback, classifier), model.keras (finetune) or packnet.npz (the pack with
every task so far), metrics.json and config.json; checkpoints every epoch, so rerunning the same
command after a crash resumes.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

from absl import app, flags

from tf_piggyback.cli import define_backbone_flags, user_errors
from tf_piggyback.core.binarizers import DEFAULT_THRESHOLD, MASK_TYPES
from tf_piggyback.core.layers import DEFAULT_MASK_SCALE, MASK_INITS
from tf_piggyback.core.methods.packnet import DEFAULT_PRUNE, validate_prune
from tf_piggyback.data.datasets import DEFAULT_CACHE_MB, PROTOCOLS, SPLIT_SEED
from tf_piggyback.training.distribute import STRATEGIES, make_strategy
from tf_piggyback.training.experiment import HEADS, RunConfig, run
from tf_piggyback.training.trainer import METHODS, PRECISIONS, TrainConfig

FLAGS = flags.FLAGS


def define_flags():
    define_backbone_flags()
    flags.DEFINE_string("dataset", None, "digits:VARIANT, digits_seg:VARIANT (per-pixel labels), tfds:NAME[/CONFIG] or "
                        "folder:PATH; over a keras-hub text preset, a tfds text set or a folder of .txt files "
                        "per class.")
    flags.DEFINE_integer("sequence_length", None, "A keras-hub text preset's tokens per example (default: its "
                         "preprocessor's).")
    flags.DEFINE_string("model_dir", None, "Where the task, metrics, config, checkpoints and logs go.")
    flags.DEFINE_enum("method", "piggyback", METHODS, "What to train.")
    flags.DEFINE_integer("epochs", 30, "Epochs (paper: 30).")
    flags.DEFINE_integer("batch_size", 32, "Global batch size (paper: 32).")
    flags.DEFINE_float("mask_lr", 1e-4, "Adam learning rate of the masks (paper: 1e-4).")
    flags.DEFINE_float("head_lr", 1e-4, "Adam learning rate of the head and BatchNorm (paper: 1e-4).")
    flags.DEFINE_float("finetune_lr", 1e-3, "SGD (momentum 0.9) learning rate for --method=finetune and packnet.")
    flags.DEFINE_integer("warmup_epochs", 5, "--method=finetune and packnet: the learning rate rises linearly to "
                         "--finetune_lr over this many epochs, at most a sixth of --epochs (at least 1), so networks "
                         "without BatchNormalization (VGG16) train (0: the paper's schedule; BUILD.md).")
    flags.DEFINE_integer("lora_rank", 4, "--method=lora: rank of the low-rank adapters on each Dense, convolution, "
                         "EinsumDense and attention projection.")
    flags.DEFINE_float("lora_lr", 1e-3, "--method=lora: Adam learning rate of the adapters.")
    flags.DEFINE_integer("lr_decay_epochs", 15, "Multiply learning rates by --lr_decay after this many epochs.")
    flags.DEFINE_float("lr_decay", 0.1, "Learning-rate decay factor (paper: 0.1 after 15 of 30 epochs).")
    flags.DEFINE_float("threshold", DEFAULT_THRESHOLD, "Mask threshold tau (paper: 5e-3).")
    flags.DEFINE_enum("mask_init", "constant", MASK_INITS, "Real-valued mask initialisation.")
    flags.DEFINE_float("mask_scale", DEFAULT_MASK_SCALE, "Constant / range of the mask init (paper: 1e-2).")
    flags.DEFINE_enum("mask_type", "binary", MASK_TYPES, "binary {0,1} or ternary {-1,0,1} masks.")
    flags.DEFINE_bool("train_bn", False, "Learn per-task BatchNormalization (paper §5.3).")
    flags.DEFINE_bool("mask_embeddings", True, "Mask Embedding tables too (--nomask_embeddings: leave them frozen).")
    flags.DEFINE_string("feature_layer", None, "The backbone layer whose output feeds the head (default: its output).")
    flags.DEFINE_bool("skip_unsupported", False, "Keep layers whose kernels cannot be masked (e.g. recurrent layers) "
                      "frozen and unmasked instead of stopping.")
    flags.DEFINE_enum("head", "auto", HEADS, "dense: Dense(classes) on pooled features. fcn: per-pixel logits (§6), "
                      "a 3x3 convolution and a transposed convolution up to the input's size over --feature_layer. "
                      "auto: fcn for per-pixel labels (digits_seg:), else dense.")
    flags.DEFINE_string("mask_from", None, "Learn masks only from this backbone layer on (e.g. conv4_block1_0_conv "
                        "in ResNet50): the layers before it stay the backbone's and get no backward pass, a faster "
                        "step with less memory (default: mask every layer; see BUILD.md for the trade-off).")
    flags.DEFINE_float("prune", DEFAULT_PRUNE, "PackNet: fraction of each layer's weights freed after a task.")
    flags.DEFINE_string("packnet_base", "", "PackNet: the --model_dir of the previous task's PackNet run "
                        "(empty: a new pack on the backbone).")
    flags.DEFINE_bool("augment", False, "A random crop (after scaling by 256/224) and horizontal flip.")
    flags.DEFINE_enum("protocol", "simple", PROTOCOLS, "simple: images resized to the input size. paper: the paper's "
                      "data handling (CUBS/Cars cropped to their boxes, Flowers on train+validation, shorter side "
                      "scaled to 256, random-sized 224 crops and flips for training, center crops for testing).")
    flags.DEFINE_bool("cache", True, "Keep decoded, resized training images (uint8) in memory after the first "
                      "epoch, up to --cache_mb; the rest are decoded every epoch.")
    flags.DEFINE_integer("cache_mb", DEFAULT_CACHE_MB, "Memory budget of --cache in MiB (224 px RGB: 147 KiB an image).")
    flags.DEFINE_enum("precision", "float32", PRECISIONS, "float32, or mixed precision: mixed_float16 (GPUs; "
                      "dynamic loss scaling; one replica) or mixed_bfloat16 (Ampere+ GPUs, recent CPUs).")
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
    flags.DEFINE_enum("strategy", "default", STRATEGIES, "Distribution: default, mirrored, multi_worker (TF_CONFIG).")
    flags.DEFINE_integer("seed", 0, "Random seed of initialisation, batch order and augmentation.")
    flags.DEFINE_integer("split_seed", SPLIT_SEED, "Seed of the held-out split of a folder: dataset without "
                         "train/ and test/; independent of --seed, recorded for evaluate.py.")
    flags.DEFINE_enum("verbose", "auto", ("auto", "0", "1"), "1: a progress bar per epoch; 0: one line per epoch; "
                      "auto: a progress bar when stdout is a terminal, else one line per epoch (CI, nohup, notebooks).")
    for name in ("dataset", "model_dir"):
        flags.mark_flag_as_required(name)


def config_from_flags():
    train = TrainConfig(method=FLAGS.method, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                        mask_lr=FLAGS.mask_lr, head_lr=FLAGS.head_lr, finetune_lr=FLAGS.finetune_lr,
                        warmup_epochs=FLAGS.warmup_epochs, lora_lr=FLAGS.lora_lr,
                        lr_decay_epochs=FLAGS.lr_decay_epochs, lr_decay=FLAGS.lr_decay, seed=FLAGS.seed,
                        precision=FLAGS.precision, jit_compile=FLAGS.jit_compile)
    return RunConfig(backbone=FLAGS.backbone, weights=FLAGS.weights, image_size=FLAGS.image_size,
                     dataset=FLAGS.dataset, threshold=FLAGS.threshold, mask_init=FLAGS.mask_init,
                     mask_scale=FLAGS.mask_scale, mask_type=FLAGS.mask_type, train_bn=FLAGS.train_bn,
                     mask_embeddings=FLAGS.mask_embeddings,
                     feature_layer=FLAGS.feature_layer, skip_unsupported=FLAGS.skip_unsupported,
                     mask_from=FLAGS.mask_from, lora_rank=FLAGS.lora_rank, head=FLAGS.head,
                     prune=validate_prune(FLAGS.prune), packnet_base=FLAGS.packnet_base, augment=FLAGS.augment,
                     protocol=FLAGS.protocol,
                     cache=FLAGS.cache, cache_mb=FLAGS.cache_mb, split_seed=FLAGS.split_seed,
                     sequence_length=FLAGS.sequence_length, train=train)


@user_errors
def main(argv):
    del argv
    config = config_from_flags()
    verbose = FLAGS.verbose if FLAGS.verbose == "auto" else int(FLAGS.verbose)
    metrics = run(config, FLAGS.model_dir, strategy=make_strategy(FLAGS.strategy), verbose=verbose)
    print(f"accuracy {metrics['accuracy']:.4f}  sparsity {metrics['sparsity']:.4f}  "
          f"task bytes {metrics.get('task_bytes', 0):,}  -> {FLAGS.model_dir}")
    for warning in metrics["warnings"]:  # the last line: a run at chance is no result
        print(f"warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
