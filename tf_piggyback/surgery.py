"""Model surgery: turn any functional Keras backbone into a task model.

`piggyback` is the paper's method; `classifier_only` and `finetune` are the two baselines of
§4 (Table 2's "Classifier Only" and "Individual Networks"), and `lora` a later one (low-rank
adapters); `bake` folds the masks (or adapters) back into plain layers for deployment.
"""

import dataclasses

import keras
import numpy as np

from tf_piggyback.binarizers import DEFAULT_THRESHOLD
from tf_piggyback.fingerprint import fingerprint
from tf_piggyback.layers import DEFAULT_MASK_SCALE, MaskedEmbedding, MaskedWrapper, wrapper_for

HEAD_NAME = "head"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task model was made from its backbone: what a task file needs to rebuild it.

    `piggyback` and `classifier_only` attach one to the model as `model.task_spec`.
    """

    method: str
    backbone_name: str
    backbone_fingerprint: str
    num_classes: int
    options: dict
    # Names of the layers whose weights the task owns (the head; per-task BatchNormalization):
    # what it trains besides its masks and what its file stores. Everything else is the backbone's.
    owned: tuple = (HEAD_NAME,)


def iter_layers(model):
    """Every layer of `model`, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)
        else:
            yield layer


def masked_layers(model):
    """The `MaskedWrapper` layers of a task model, in graph order."""
    return [layer for layer in iter_layers(model) if isinstance(layer, MaskedWrapper)]


ADAPTERS = ("lora_kernel_a", "lora_kernel_b")


def lora_adapters(layer):
    """The LoRA adapters (`lora_kernel_a`, `lora_kernel_b`) of `layer` and its sublayers (none
    for an operation of a functional graph, `x + y` or a `keras.ops` call, which holds no weights)."""
    return [w for w in getattr(layer, "weights", ()) if w.path.rsplit("/", 1)[-1] in ADAPTERS]


def _lora_targets(layer):
    """The layers inside `layer` that `lora` adapts: itself if Keras can (`enable_lora`: Dense,
    EinsumDense, convolutions), or a MultiHeadAttention's four projections."""
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return [layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense]
    if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D, keras.layers.Conv2D,
                          keras.layers.Conv3D)):
        return [layer]
    return []


def task_layers(model):
    """The layers whose weights a task model owns: `TaskSpec.owned` for `piggyback` and
    `classifier_only` models; every layer for a model without a spec (finetune)."""
    spec = getattr(model, "task_spec", None)
    layers = list(iter_layers(model))
    return layers if spec is None else [layer for layer in layers if layer.name in set(spec.owned)]


def freeze_backbone(model):
    """Makes a task model train exactly what its task owns: its masks and owned layers
    trainable, every other layer (and every masked layer's wrapped backbone layer) not; returns
    how many backbone layers had been made trainable.

    Keras propagates `trainable=True` to sublayers, so `model.trainable = True` or
    `backbone.trainable = True` would otherwise let a step train backbone kernels and run its
    BatchNormalization in training mode, updating its statistics. The backbone never changes
    (§3: `W` is fixed, so tasks cannot interfere).
    """
    owned = set(model.task_spec.owned)
    unfrozen = 0
    for layer in iter_layers(model):
        adapters = {id(w) for w in lora_adapters(layer)}
        if isinstance(layer, MaskedWrapper):
            unfrozen += int(layer.layer.trainable)
            layer.trainable = True  # its masks; Keras sets the wrapped layer too, so then:
            layer.layer.trainable = False
        elif layer.name in owned:
            layer.trainable = True
        elif adapters:  # a LoRA copy: only its adapters train, its kernels and biases stay the backbone's
            unfrozen += int(any(w.trainable for w in layer.weights if id(w) not in adapters))
            layer.trainable = True
            for w in layer.weights:
                w.trainable = id(w) in adapters
        elif layer.trainable and layer.weights:
            layer.trainable = False
            unfrozen += 1
    return unfrozen


def mask_sparsity(masks):
    """The fraction of zeros over all of `masks` (thresholded NumPy arrays); 0.0 for none."""
    total = sum(m.size for m in masks)
    return float(sum(int(np.count_nonzero(m == 0)) for m in masks) / total) if total else 0.0


def _has_kernel(layer):
    return any(w.path.rsplit("/", 1)[-1].endswith("kernel") for w in layer.weights)


def _inputs(model):
    """`model`'s inputs in the structure it is called with: one tensor, not a list of one (Keras
    warns on every call of a model built from `[image]` with an image)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def feature_model(backbone, feature_layer=None):
    """The part of `backbone` whose output feeds the new head.

    Args:
        backbone: a functional or Sequential Keras model.
        feature_layer: name of the layer whose output are the features; default the
            backbone's output, which must not be an ImageNet-style softmax classifier.
    """
    if not isinstance(backbone, keras.Model) or isinstance(backbone, keras.Sequential) and not backbone.built:
        raise ValueError(
            f"backbone must be a built functional or Sequential keras.Model. Received: {type(backbone).__name__}"
        )
    if feature_layer is not None:
        try:
            layer = backbone.get_layer(feature_layer)
        except ValueError:
            raise ValueError(
                f"feature_layer {feature_layer!r} is not a layer of backbone {backbone.name!r}"
            ) from None
        return keras.Model(_inputs(backbone), layer.output, name=backbone.name)
    last = backbone.layers[-1]
    if isinstance(last, keras.layers.Dense) and getattr(last.activation, "__name__", "") == "softmax":
        raise ValueError(
            f"backbone {backbone.name!r} ends in the softmax classifier {last.name!r}; build it "
            "headless (keras.applications: include_top=False, pooling='avg') or pass feature_layer=..."
        )
    return backbone


def _upstream_layers(features, mask_from):
    """`{id(layer)}` of the layers that compute `mask_from`'s input (none without `mask_from`)."""
    if mask_from is None:
        return set()
    try:
        layer = features.get_layer(mask_from)
    except ValueError:
        raise ValueError(f"mask_from {mask_from!r} is not a layer of backbone {features.name!r}") from None
    if not _has_kernel(layer):
        raise ValueError(f"mask_from {mask_from!r} is a {type(layer).__name__}, which has no kernel to mask; "
                         "name the first layer to mask, e.g. a convolution")
    upstream = keras.Model(features.inputs, layer.input)  # exactly the layers upstream of it
    return {id(each) for each in iter_layers(upstream)}


_POOLING = {3: keras.layers.GlobalAveragePooling1D, 4: keras.layers.GlobalAveragePooling2D,
            5: keras.layers.GlobalAveragePooling3D}


def pool_features(features):
    """What the head sees: spatial features global-average-pooled (channels last), else as they are."""
    if len(features.shape) in _POOLING:
        return _POOLING[len(features.shape)](name="head_pool")(features)
    return features


def fcn_head(num_classes, scale, width=64):
    """A head for dense prediction (§6), FCN-style: a 3x3 convolution (ReLU), then a transposed
    convolution that upsamples the feature map `scale` times to per-pixel logits."""
    return keras.Sequential([
        keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="head_conv"),
        keras.layers.Conv2DTranspose(int(num_classes), 2 * scale, strides=scale, padding="same", name="head_up"),
    ], name=HEAD_NAME)


def add_head(body, num_classes, name, head=None):
    """`body` and a head: `Dense(num_classes)` on pooled features, or the user's `head` (any Keras
    layer or model, e.g. `fcn_head`) on the feature map itself, its output the logits."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2. Received: num_classes={num_classes!r}")
    if head is None:
        logits = keras.layers.Dense(int(num_classes), name=HEAD_NAME)(pool_features(body.output))
    else:
        clash = sorted({layer.name for layer in _head_layers(head)} & {layer.name for layer in iter_layers(body)})
        if clash:
            raise ValueError(f"the head's layer names {clash} are the backbone's too; rename them")
        logits = head(body.output)
        if logits.shape[-1] != num_classes:
            raise ValueError(f"the head outputs {logits.shape[-1]} channels; the task has {num_classes} classes")
    return keras.Model(_inputs(body), logits, name=name)


def _head_layers(head):
    return list(iter_layers(head)) if isinstance(head, keras.Model) else [head]


def _task_head(head):
    """`(head layer or None, what options record of it)`: a user's head is stored as its Keras
    config (JSON; no code, no pickle) and rebuilt from it, in safe mode."""
    if head is None:
        return None, {}
    if isinstance(head, dict):
        head = keras.saving.deserialize_keras_object(head, safe_mode=True)
    if not isinstance(head, keras.layers.Layer):
        raise ValueError(f"head must be a Keras layer or model. Received: {type(head).__name__}")
    return head, {"head": keras.saving.serialize_keras_object(head)}


def _owned(head, *names):
    return (*names, *(layer.name for layer in _head_layers(head))) if head is not None else (*names, HEAD_NAME)


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
        if _has_kernel(layer) and wrapper_for(layer) is None and id(layer) not in kept
    ]
    if unsupported and not skip_unsupported:
        raise ValueError(
            "Cannot mask these layers, of unsupported types: " + ", ".join(unsupported)
            + ". Pass skip_unsupported=True to keep them frozen and unmasked."
        )
    options = dict(threshold=threshold, mask_init=mask_init, mask_scale=mask_scale, mask_type=mask_type)
    bn_copies = []

    def clone(layer):
        if id(layer) in kept:
            layer.trainable = False
            return layer
        cls = wrapper_for(layer)
        if cls is MaskedEmbedding and not mask_embeddings:
            cls = None
        if cls is not None:
            return cls(layer, **options)
        if train_bn and isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            copy = type(layer).from_config({**layer.get_config(), "trainable": True})
            bn_copies.append((copy, layer))
            return copy
        layer.trainable = False
        return layer

    body = keras.models.clone_model(features, clone_function=clone, recursive=True)
    for copy, layer in bn_copies:
        copy.set_weights(layer.get_weights())
    head, stored = _task_head(head)
    model = add_head(body, num_classes, name=f"piggyback_{backbone.name}", head=head)
    options = {**options, "train_bn": bool(train_bn), "feature_layer": feature_layer,
               "skip_unsupported": bool(skip_unsupported), "mask_from": mask_from,
               "mask_embeddings": bool(mask_embeddings), **stored}
    owned = _owned(head, *(copy.name for copy, _ in bn_copies))
    model.task_spec = TaskSpec("piggyback", backbone.name, fingerprint(backbone), int(num_classes), options, owned)
    return model


def classifier_only(backbone, num_classes, *, feature_layer=None, head=None):
    """The "Classifier Only" baseline: the frozen, shared backbone and a new linear head (or
    `head`, as for `piggyback`).

    Reference: §4, Table 2.
    """
    features = feature_model(backbone, feature_layer)
    for layer in iter_layers(features):
        layer.trainable = False
    body = keras.models.clone_model(features, clone_function=lambda layer: layer, recursive=True)
    head, stored = _task_head(head)
    model = add_head(body, num_classes, name=f"classifier_{backbone.name}", head=head)
    model.task_spec = TaskSpec("classifier", backbone.name, fingerprint(backbone), int(num_classes),
                               {"feature_layer": feature_layer, **stored}, _owned(head))
    return model


def lora(backbone, num_classes, *, rank, feature_layer=None):
    """The LoRA baseline (Hu et al., ICLR 2022): low-rank adapters `W + (alpha / r) A B` learned
    on copies of the backbone's Dense, EinsumDense, convolution and attention-projection layers
    (Keras' `enable_lora(rank)`; alpha = r). Kernels and biases stay the backbone's values,
    BatchNormalization stays frozen, and the task owns only the adapters and a new head; a
    layer Keras cannot adapt (depthwise and separable convolutions) stays frozen and shared.

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
    copies = []

    def clone(layer):
        if _lora_targets(layer):
            copy = type(layer).from_config(layer.get_config())
            copies.append((copy, layer))
            return copy
        layer.trainable = False
        return layer

    body = keras.models.clone_model(features, clone_function=clone, recursive=True)
    for copy, layer in copies:
        copy.set_weights(layer.get_weights())
        for target in _lora_targets(copy):
            target.enable_lora(int(rank))
    model = add_head(body, num_classes, name=f"lora_{backbone.name}")
    model.task_spec = TaskSpec("lora", backbone.name, fingerprint(backbone), int(num_classes),
                               {"rank": int(rank), "feature_layer": feature_layer})
    freeze_backbone(model)
    return model


def _merged(layer):
    """A LoRA copy's weights without its adapters, each adapted kernel merged (`W + (alpha/r) A B`,
    Keras' `kernel` property), in the order of a fresh layer of the same config."""
    merged = {}
    for target in _lora_targets(layer):
        if getattr(target, "lora_enabled", False):
            variable = next(w for w in target.weights if w.path.rsplit("/", 1)[-1] == "kernel")
            merged[variable.path] = target.kernel
    return [merged.get(w.path, w) for w in layer.weights if w.path.rsplit("/", 1)[-1] not in ADAPTERS]


def finetune(backbone, num_classes, *, feature_layer=None, head=None):
    """The "Individual Networks" baseline: a trainable copy of the whole backbone and a head
    (`Dense`, or `head` as for `piggyback`).

    The backbone itself is not touched. Reference: §4, Table 2 (SGD momentum, lr 1e-3).
    """
    features = feature_model(backbone, feature_layer)
    body = keras.models.clone_model(features, recursive=True)
    body.set_weights(features.get_weights())
    for layer in iter_layers(body):
        layer.trainable = True
    return add_head(body, num_classes, name=f"finetune_{backbone.name}", head=_task_head(head)[0])


def bake(model):
    """A plain Keras model with each `W ⊙ m` folded into an ordinary layer.

    The result has no mask or binarizer ops, computes the same outputs as `model`
    (the masks are exactly 0, 1 or -1, so the products are exact) and can be saved or
    exported without this library. Unmasked layers are shared with `model`.

    Example:
    >>> import tf_piggyback as pb
    >>> plain = bake(piggyback(pb.digits_backbone(), num_classes=10))
    >>> any(isinstance(layer, MaskedWrapper) for layer in plain.layers)
    False

    Reference: §3, last paragraph: after training only the thresholded masks are kept.
    """
    return bake_with_layers(model)[0]


def bake_with_layers(model):
    """`bake(model)` and `[(wrapper, plain layer)]`: which new layer replaced each `MaskedWrapper`
    (LoRA copies are replaced too, by plain layers with merged kernels).

    A plain layer's `weights` are in the order of `wrapper.layer.weights` (the backbone's).
    """
    baked = []

    def clone(layer):
        if lora_adapters(layer):
            config = {k: v for k, v in layer.get_config().items() if not k.startswith("lora_")}
            plain = type(layer).from_config(config)
            baked.append((None, plain, [keras.ops.convert_to_numpy(w) for w in _merged(layer)]))
            return plain
        if not isinstance(layer, MaskedWrapper):
            return layer
        inner = layer.layer
        plain = type(inner).from_config(inner.get_config())
        products = {k.path: k_m for k, k_m in zip(layer.kernels, layer.masked_kernels())}
        values = [keras.ops.convert_to_numpy(products.get(w.path, w)) for w in inner.weights]
        baked.append((layer, plain, values))
        return plain

    result = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for _, plain, values in baked:
        plain.set_weights(values)
    return result, [(wrapper, plain) for wrapper, plain, _ in baked if wrapper is not None]
