"""Piggyback (§3): a learned binary mask over every kernel of the frozen backbone, and a new head.

Reference: §3 (masking), §5.2 (masking from a layer on), §5.3 (per-task batchnorm).
"""

import keras

from tf_piggyback.core.binarizers import DEFAULT_THRESHOLD
from tf_piggyback.core.fingerprint import backbone_entry
from tf_piggyback.core.layers import DEFAULT_MASK_SCALE, MaskedEmbedding, wrapper_for
from tf_piggyback.core.methods.base import Method, register
from tf_piggyback.core.surgery import (BackboneSource, TaskSpec, add_head, feature_model, iter_layers, kernel_weights,
                                       layer_copies, owned_layers, remember_backbone, task_head)


def _upstream_layers(features, mask_from):
    """`{id(layer)}` of the layers that compute `mask_from`'s input (none without `mask_from`)."""
    if mask_from is None:
        return set()
    try:
        layer = features.get_layer(mask_from)
    except ValueError:
        raise ValueError(f"mask_from {mask_from!r} is not a layer of backbone {features.name!r}") from None
    if not kernel_weights(layer):
        raise ValueError(f"mask_from {mask_from!r} is a {type(layer).__name__}, which has no kernel to mask; "
                         "name the first layer to mask, e.g. a convolution")
    upstream = keras.Model(features.inputs, layer.input)  # exactly the layers upstream of it
    return {id(each) for each in iter_layers(upstream)}



def piggyback(
    backbone,
    num_classes,
    *,
    threshold=DEFAULT_THRESHOLD,
    mask_init="constant",
    mask_scale=DEFAULT_MASK_SCALE,
    mask_type="binary",
    train_bn=False,
    feature_layer=None,
    skip_unsupported=False,
    mask_from=None,
    head=None,
    mask_embeddings=True,
):
    """Wraps every Conv / DepthwiseConv2D / SeparableConv2D / Dense kernel with a mask, and
    every EinsumDense, MultiHeadAttention and transposed-convolution kernel (`MaskedLayer`).

    The backbone's layers are reused, not copied: their weights are shared by every task
    model made from the backbone and set to `trainable=False`. Biases are frozen and
    BatchNormalization runs in inference mode with frozen statistics, unless `train_bn`
    gives the task its own BatchNormalization layers (§5.3). A new `Dense(num_classes)`
    head named `"head"` outputs logits (after global average pooling for spatial features).

    Args:
        backbone: functional or Sequential Keras model, e.g. any `keras.applications`
            model built with `include_top=False`, or `tf_piggyback.digits_backbone()`.
        num_classes: classes of the new task.
        threshold, mask_init, mask_scale, mask_type: see `MaskedWrapper`.
        train_bn: learn per-task BatchNormalization parameters and statistics (§5.3) and, in
            transformers, per-task LayerNormalization parameters.
        feature_layer: optional name of the backbone layer that feeds the head.
        skip_unsupported: keep layers with kernels this library cannot mask (e.g. recurrent
            layers, causal `Conv1D`) frozen and unmasked instead of raising.
        head: optional Keras layer or model from the features to the logits (default
            `Dense(num_classes)` after global pooling), e.g. `fcn_head` for per-pixel logits
            (§6); its layers are the task's own, and the task file stores its config.
        mask_from: optional name of a backbone layer: learn masks only from it on. Every
            layer its input is computed from stays the backbone's, unmasked and shared, so
            the backward pass stops there (§5.2 and Fig. 3: the first layers change least).
            In a ResNet, `"conv4_block1_0_conv"` or `"conv4_block1_1_conv"` (the block's two
            first convolutions, neither computed from the other) masks stages 4 and 5, shortcut
            included. Default: mask every layer.
        mask_embeddings: mask `Embedding` tables too (`MaskedEmbedding`), as the kernels of a
            language backbone; False leaves them frozen and shared. (Task files written before
            this option left them frozen, and load so.)

    Returns:
        An uncompiled `keras.Model` whose only trainable weights are the masks, the head
        and, with `train_bn`, the BatchNormalization parameters.

    Example:
    >>> backbone = keras.applications.MobileNetV2(
    ...     weights=None, include_top=False, pooling="avg", input_shape=(96, 96, 3))
    >>> model = piggyback(backbone, num_classes=10)
    >>> model.output_shape
    (None, 10)

    Reference: §3 (masking), §5.3 (per-task batchnorm).
    """
    features = feature_model(backbone, feature_layer)
    kept = _upstream_layers(features, mask_from)
    unsupported = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in iter_layers(features)
        if kernel_weights(layer) and wrapper_for(layer) is None and id(layer) not in kept
    ]
    if unsupported and not skip_unsupported:
        raise ValueError(
            "Cannot mask these layers, of unsupported types: " + ", ".join(unsupported)
            + ". Pass skip_unsupported=True to keep them frozen and unmasked."
        )
    options = dict(threshold=threshold, mask_init=mask_init, mask_scale=mask_scale, mask_type=mask_type)
    source = BackboneSource.of(backbone)
    index = {id(layer): i for i, layer in enumerate(iter_layers(backbone))}
    norms = [layer for layer in iter_layers(features) if train_bn and id(layer) not in kept
             and isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization))]
    # Per-task norm copies (§5.3) from one copy of the backbone through keras.saving, as bake makes its copies.
    bn_copies = layer_copies(source, [(layer, index[id(layer)]) for layer in norms])
    stand_ins = {}

    def clone(layer):
        if id(layer) in kept:
            layer.trainable = False
            return layer
        cls = wrapper_for(layer)
        if cls is MaskedEmbedding and not mask_embeddings:
            cls = None
        if cls is not None:
            wrapper = cls(layer, **options)
            stand_ins[id(wrapper)] = layer
            return wrapper
        if id(layer) in bn_copies:
            copy = bn_copies[id(layer)]
            copy.trainable = True
            stand_ins[id(copy)] = layer
            return copy
        layer.trainable = False
        return layer

    try:
        body = keras.models.clone_model(features, clone_function=clone, recursive=True)
    except ValueError as e:  # Keras cannot re-run this graph (keras-hub 0.32's DINOv3): refused in one line
        raise ValueError(f"{type(backbone).__name__} {backbone.name!r} cannot be masked: keras.models.clone_model "
                         f"cannot rebuild its graph ({str(e).strip().splitlines()[0][:160]})") from None
    head, stored = task_head(head)
    model = add_head(body, num_classes, name=f"piggyback_{backbone.name}", head=head)
    options = {**options, "train_bn": bool(train_bn), "feature_layer": feature_layer,
               "skip_unsupported": bool(skip_unsupported), "mask_from": mask_from,
               "mask_embeddings": bool(mask_embeddings), **stored}
    owned = owned_layers(head, *(copy.name for copy in bn_copies.values()))
    model.task_spec = TaskSpec("piggyback", backbone_entry(backbone), int(num_classes), options, owned)
    return remember_backbone(model, source, backbone, stand_ins)


@register
class Piggyback(Method):
    name = "piggyback"
    takes_mask_from = True

    def build(self, backbone, num_classes, config, head=None):
        return piggyback(backbone, num_classes, threshold=config.threshold, mask_init=config.mask_init,
                         mask_scale=config.mask_scale, mask_type=config.mask_type, train_bn=config.train_bn,
                         feature_layer=config.feature_layer, skip_unsupported=config.skip_unsupported,
                         mask_from=config.mask_from, head=head, mask_embeddings=config.mask_embeddings)

    def load(self, backbone, manifest):
        # Files from before `mask_embeddings` left Embedding tables frozen.
        return piggyback(backbone, manifest["num_classes"], **{"mask_embeddings": False, **manifest["options"]})
