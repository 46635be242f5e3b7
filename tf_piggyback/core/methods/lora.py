"""LoRA (Hu et al., ICLR 2022), a later baseline: low-rank adapters on copies of the backbone's
layers, trained with Adam at `lora_lr`; `surgery.bake` merges them into full kernels."""

import keras
import numpy as np

from tf_piggyback.core.fingerprint import backbone_entry
from tf_piggyback.core.layers import is_composite
from tf_piggyback.core.methods.base import Method, register, schedule
from tf_piggyback.core.surgery import BackboneSource, TaskSpec, add_head, feature_model, freeze_backbone, iter_layers, \
    layer_copies, lora_adapters, lora_targets, remember_backbone, task_weights


def lora(backbone, num_classes, *, rank, feature_layer=None):
    """The LoRA baseline (Hu et al., ICLR 2022): low-rank adapters `W + (alpha / r) A B` learned
    on copies of the backbone's Dense, EinsumDense and convolution layers, wherever they sit: at
    the top of the graph or inside a composite layer (attention projections, a keras-hub
    encoder's attention and MLP, a user's `Layer` subclass), found as `surgery.lora_targets`
    (Keras' `enable_lora(rank)`; alpha = r). Kernels and biases stay the backbone's values,
    normalization stays frozen, and the task owns only the adapters and a new head; a layer
    Keras cannot adapt (depthwise and separable convolutions) stays frozen and shared.

    Unlike a piggyback task, a LoRA task model copies the layers it adapts (Keras adds the
    adapters to the layer itself), and `bake` merges each adapter into a full float kernel: a
    task served alone is a whole network, and tasks cannot share one `TaskBank`.

    Args:
        backbone, num_classes, feature_layer: as for `piggyback`.
        rank: the adapters' rank r, an integer >= 1.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1. Received: rank={rank!r}")
    features = feature_model(backbone, feature_layer)
    unreached = [f"{layer.name} ({type(layer).__name__})" for layer in iter_layers(features)
                 if not lora_targets(layer) and is_composite(layer)]
    if unreached:
        raise ValueError("LoRA adapts Dense, EinsumDense and convolution layers; these hold kernels in no such "
                         f"layer: {', '.join(unreached[:4])}"
                         f"{', ...' if len(unreached) > 4 else ''}. Use piggyback, which masks them")
    # Copied through the backbone's own save and load (keras-hub 0.32's Qwen 3 decoder does not
    # rebuild from its own config), weights set before any adapter is added.
    source, index = BackboneSource.of(backbone), {id(layer): i for i, layer in enumerate(iter_layers(backbone))}
    targets = [layer for layer in iter_layers(features) if lora_targets(layer)]
    copies = layer_copies(source, [(layer, index[id(layer)]) for layer in targets])
    for copy in copies.values():
        for target in lora_targets(copy):
            target.enable_lora(int(rank))

    def clone(layer):
        if id(layer) in copies:
            return copies[id(layer)]
        layer.trainable = False
        return layer

    body = keras.models.clone_model(features, clone_function=clone, recursive=True)
    model = add_head(body, num_classes, name=f"lora_{backbone.name}")
    model.task_spec = TaskSpec("lora", backbone_entry(backbone), int(num_classes),
                               {"rank": int(rank), "feature_layer": feature_layer})
    freeze_backbone(model)
    return remember_backbone(model, source, backbone, {id(copies[id(layer)]): layer for layer in targets})


@register
class Lora(Method):
    name = "lora"
    takes_head = False
    learning_rates = ("lora_lr", "head_lr")

    def build(self, backbone, num_classes, config, head=None):
        return lora(backbone, num_classes, rank=config.lora_rank, feature_layer=config.feature_layer)

    def load(self, backbone, manifest):
        return lora(backbone, manifest["num_classes"], **manifest["options"])

    def optimizers(self, model, config, steps_per_epoch):
        adapters = {id(w) for layer in iter_layers(model) for w in lora_adapters(layer)}
        groups = ((config.lora_lr, [w for w in task_weights(model) if id(w) in adapters]),
                  (config.head_lr, [w for w in task_weights(model) if w.trainable and id(w) not in adapters]))
        return [(keras.optimizers.Adam(schedule(lr, config, steps_per_epoch)), variables)
                for lr, variables in groups if variables]

    def label(self, config):
        return f"lora (r={config['lora_rank']})"

    def served_alone(self, manifest):
        return "is a LoRA task: its adapters merge into full float kernels, a copy of their own"
