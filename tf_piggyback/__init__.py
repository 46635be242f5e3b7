"""tf_piggyback: Piggyback (Mallya, Davis, Lazebnik, ECCV 2018) for Keras 3 / TensorFlow.

One frozen backbone serves many tasks; each task learns a binary mask over the backbone's
weights (1 bit per parameter) and a small head.

Example:
>>> import tf_piggyback as pb
>>> backbone = pb.digits_backbone()
>>> model = pb.piggyback(backbone, num_classes=5)
>>> # ... train model (pb.train), then:
>>> manifest = pb.save_task(model, "upper/task.npz")
>>> same = pb.load_task("upper/task.npz", pb.digits_backbone())
>>> plain = pb.bake(same)
>>> [layer for layer in plain.layers if "Masked" in type(layer).__name__]
[]
"""

from tf_piggyback import deprecated
from tf_piggyback.core.binarizers import binarize, ternarize
from tf_piggyback.core.fingerprint import fingerprint
from tf_piggyback.core.layers import (MaskedComposite, MaskedConv, MaskedDense, MaskedDepthwiseConv2D, MaskedEmbedding,
                                      MaskedLayer, MaskedSeparableConv2D, MaskedWrapper)
from tf_piggyback.core.methods.classifier import classifier_only
from tf_piggyback.core.methods.finetune import finetune
from tf_piggyback.core.methods.lora import lora
from tf_piggyback.core.methods.packnet import PackNet
from tf_piggyback.core.methods.piggyback import piggyback
from tf_piggyback.core.surgery import bake, masked_layers
from tf_piggyback.core.taskfile import TaskFileError, load_task, read_manifest, save_task
from tf_piggyback.data.datasets import load_dataset, load_digits_variant
from tf_piggyback.training.backbones import digits_backbone, load_backbone
from tf_piggyback.training.callbacks import MaskSparsity, TrainingMonitor
from tf_piggyback.training.evaluation import evaluate
from tf_piggyback.training.trainer import TrainConfig, train

deprecated.install()  # `tf_piggyback.phone` and the other paths before the wings, for one release


def __getattr__(name):
    """`pb.trainer`, `pb.surgery`, ...: the flat layout's modules as attributes, for one release."""
    return deprecated.attribute(name)


__all__ = [
    "MaskedComposite", "MaskedConv", "MaskedDense", "MaskedDepthwiseConv2D", "MaskedEmbedding", "MaskedLayer",
    "MaskSparsity", "MaskedSeparableConv2D", "MaskedWrapper", "TrainingMonitor",
    "PackNet", "TaskFileError", "TrainConfig", "bake", "binarize", "classifier_only", "digits_backbone",
    "evaluate", "fingerprint", "finetune", "load_backbone", "load_dataset", "load_digits_variant",
    "load_task", "lora", "masked_layers", "piggyback", "read_manifest", "save_task", "ternarize", "train",
]
