"""Model surgery shared by every method (`tf_piggyback.core.methods`): the layers of a task model and
which of them it owns (`TaskSpec`, `task_weights`), the backbone's features and the new head,
freezing the backbone, and `bake`, which folds masks (or LoRA adapters) back into plain layers
for deployment.
"""

import collections
import dataclasses
import json

import keras
import numpy as np

from tf_piggyback.core.layers import MaskedWrapper, is_kernel

HEAD_NAME = "head"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task model was made from its backbone: what a task file needs to rebuild it.

    The methods that write task files (piggyback, classifier-only, LoRA) attach one to the model
    as `model.task_spec`.
    """

    method: str
    backbone: dict  # what the task file records of the backbone (fingerprint.backbone_entry)
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


ADAPTABLE = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D, keras.layers.Conv2D,
             keras.layers.Conv3D)


def lora_targets(layer):
    """The layers inside `layer` that `lora` adapts: itself if Keras can (`enable_lora`: Dense,
    EinsumDense, convolutions), else every such layer it holds at any depth (a MultiHeadAttention's
    four projections, a keras-hub encoder's attention and MLP, a user's `Layer` with `Dense` inside)."""
    if isinstance(layer, ADAPTABLE):
        return [layer]
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        return []
    return [sub for sub in layer._flatten_layers(include_self=False) if isinstance(sub, ADAPTABLE)]


def owned_names(model):
    """`TaskSpec.owned` of a task model, `HEAD_NAME` read as its head's name (`head_name`)."""
    return {head_name(model) if name == HEAD_NAME else name for name in model.task_spec.owned}


def task_layers(model):
    """The layers whose weights a task model owns: `TaskSpec.owned` for a model with a spec
    (`owned_names`); every layer for a model without one (finetune)."""
    layers = list(iter_layers(model))
    if getattr(model, "task_spec", None) is None:
        return layers
    owned = owned_names(model)
    return [layer for layer in layers if layer.name in owned]


def task_weights(model):
    """The weights a task owns besides its masks: head, BatchNormalization with `train_bn`
    (`TaskSpec.owned`) and a LoRA task's adapters, whatever their `trainable` flags say, in the
    model's layer order. Everything else in the model belongs to the shared backbone."""
    owned = {id(layer) for layer in task_layers(model)}
    return [w for layer in iter_layers(model) for w in (layer.weights if id(layer) in owned else lora_adapters(layer))]


def freeze_backbone(model):
    """Makes a task model train exactly what its task owns: its masks and owned layers
    trainable, every other layer (and every masked layer's wrapped backbone layer) not; returns
    how many backbone layers had been made trainable.

    Keras propagates `trainable=True` to sublayers, so `model.trainable = True` or
    `backbone.trainable = True` would otherwise let a step train backbone kernels and run its
    BatchNormalization in training mode, updating its statistics. The backbone never changes
    (§3: `W` is fixed, so tasks cannot interfere).
    """
    owned = owned_names(model)
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
            for sub in layer._flatten_layers(include_self=False):  # parents first; a composite's norms stay frozen
                sub.trainable = bool(lora_adapters(sub))
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


def kernel_weights(layer):
    """Every kernel-like weight of `layer` (`kernel`, `depthwise_kernel`, `recurrent_kernel`, ...):
    what a method must mask, adapt or prune. (`layers.MaskedWrapper.kernels` are the `kernel`s of
    a layer it wraps.)"""
    return [w for w in layer.weights if w.path.rsplit("/", 1)[-1].endswith("kernel")]


def _inputs(model):
    """`model`'s inputs in the structure it is called with: a dict as a dict (keras-hub's text
    backbones: `token_ids`, `padding_mask`, ...), one tensor, not a list of one (Keras warns on
    every call of a model built from `[image]` with an image)."""
    if isinstance(model.input, dict):
        return model.input
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def feature_model(backbone, feature_layer=None):
    """The part of `backbone` whose output feeds the new head.

    Args:
        backbone: a functional or Sequential Keras model.
        feature_layer: name of the layer whose output are the features, or of one of the
            backbone's named outputs (keras-hub BERT: `"pooled_output"` or `"sequence_output"`);
            default the backbone's one output, which must not be an ImageNet-style softmax
            classifier.
    """
    if not isinstance(backbone, keras.Model) or isinstance(backbone, keras.Sequential) and not backbone.built:
        raise ValueError(
            f"backbone must be a built functional or Sequential keras.Model. Received: {type(backbone).__name__}"
        )
    paths = collections.Counter(w.path for w in backbone.weights)
    if max(paths.values(), default=1) > 1:  # keras-hub 0.32's SmolLM: every "o_proj/kernel"
        raise ValueError(f"{type(backbone).__name__} {backbone.name!r} has several weights at one path "
                         f"({', '.join(sorted(p for p, n in paths.items() if n > 1)[:3])}); task files find "
                         "weights by path, so its tasks could not be saved and loaded")
    outputs = backbone.output if isinstance(backbone.output, dict) else {}
    if feature_layer in outputs:
        return keras.Model(_inputs(backbone), outputs[feature_layer], name=backbone.name)
    if feature_layer is None and len(backbone.outputs) > 1:
        raise ValueError(f"backbone {backbone.name!r} has {len(backbone.outputs)} outputs"
                         + (f" ({', '.join(outputs)})" if outputs else "")
                         + "; pass feature_layer= the output or layer the head reads")
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


_POOLING = {3: keras.layers.GlobalAveragePooling1D, 4: keras.layers.GlobalAveragePooling2D,
            5: keras.layers.GlobalAveragePooling3D}


def pool_features(features, padding_mask=None, name="head_pool"):
    """What the head sees: spatial features or a token sequence global-average-pooled (channels
    last; a sequence over the tokens `padding_mask` marks, when given), else as they are."""
    if len(features.shape) in _POOLING:
        pooling = _POOLING[len(features.shape)](name=name)
        return pooling(features) if padding_mask is None else pooling(features, mask=padding_mask)
    return features


def fcn_head(num_classes, scale, width=64):
    """A head for dense prediction (§6), FCN-style: a 3x3 convolution (ReLU), then a transposed
    convolution that upsamples the feature map `scale` times to per-pixel logits."""
    return keras.Sequential([
        keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="head_conv"),
        keras.layers.Conv2DTranspose(int(num_classes), 2 * scale, strides=scale, padding="same", name="head_up"),
    ], name=HEAD_NAME)


def unused_name(model, name):
    """`name`, or `name_1`, `name_2`, ... where `model` has a layer of that name at any depth (the
    layers a task adds must not take a backbone's names: keras-hub SigLIP's vision encoder has its
    own `head`)."""
    used = {layer.name for layer in iter_layers(model)}
    candidate, count = name, 0
    while candidate in used:
        count += 1
        candidate = f"{name}_{count}"
    return candidate


def head_name(model):
    """The name of a task model's head, its last layer: `HEAD_NAME`, unless its backbone has a
    layer of that name (`unused_name`). `TaskSpec.owned` lists the default head as `HEAD_NAME`."""
    return model.layers[-1].name


def add_head(body, num_classes, name, head=None):
    """`body` and a head: `Dense(num_classes)` on pooled features, or the user's `head` (any Keras
    layer or model, e.g. `fcn_head`) on the feature map itself, its output the logits. The Dense
    head and its pooling take names `body` does not use (`unused_name`, `head_name`)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2. Received: num_classes={num_classes!r}")
    if head is None:
        padding_mask = body.input.get("padding_mask") if isinstance(body.input, dict) else None
        pooled = pool_features(body.output, padding_mask, name=unused_name(body, "head_pool"))
        logits = keras.layers.Dense(int(num_classes), name=unused_name(body, HEAD_NAME))(pooled)
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


def task_head(head):
    """`(head layer or None, what options record of it)`: a user's head is stored as its Keras
    config (JSON; no code, no pickle) and rebuilt from it, in safe mode."""
    if head is None:
        return None, {}
    if isinstance(head, dict):
        head = keras.saving.deserialize_keras_object(head, safe_mode=True)
    if not isinstance(head, keras.layers.Layer):
        raise ValueError(f"head must be a Keras layer or model. Received: {type(head).__name__}")
    return head, {"head": keras.saving.serialize_keras_object(head)}


def owned_layers(head, *names):
    """`TaskSpec.owned`: the layers `names` (e.g. per-task BatchNormalization) and the head's."""
    return (*names, *(layer.name for layer in _head_layers(head))) if head is not None else (*names, HEAD_NAME)


def _line(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


@dataclasses.dataclass(frozen=True)
class BackboneSource:
    """A backbone's config as a `.keras` file stores it (`Model.to_json`), or why it has none, and
    which of its layers each layer of a task model stands for: what `layer_copies` copies from
    after the backbone object is gone. A task model holds its own as `model.backbone_source`."""

    name: str
    class_name: str
    config: str = None
    error: str = None
    # Per layer of `iter_layers(task model)`: the index in `iter_layers(backbone)` of the backbone
    # layer it is (or wraps, or copies), else None (the head).
    indices: tuple = ()

    @classmethod
    def of(cls, backbone):
        try:
            return cls(backbone.name, type(backbone).__name__, backbone.to_json())
        except Exception as e:  # refused when a copy is asked for (`copy`), not before
            return cls(backbone.name, type(backbone).__name__, error=_line(e))

    def copy(self):
        """A new model from `config` as `keras.saving` loads one, fresh weights; parsed anew each
        time (keras-hub 0.32's `SegFormerBackbone.from_config` writes into the config it gets)."""
        error = self.error
        if error is None:
            try:  # our own config, not a file's: Lambda layers may load
                return keras.saving.deserialize_keras_object(json.loads(self.config), safe_mode=False)
            except Exception as e:  # the family's own load is broken: refused in one line below
                error = _line(e)
        raise ValueError(f"{self.class_name} {self.name!r} does not load back from its keras.saving config ({error}), "
                         "so it cannot be copied to bake or adapt; use a backbone that saves and loads")


def remember_backbone(model, source, backbone, stand_ins=None):
    """Sets `model.backbone_source`: `source` (`BackboneSource.of(backbone)`) with the backbone
    index of each of `model`'s layers. `stand_ins`: `{id(layer of model): backbone layer}` for the
    layers a method put in place of the backbone's (mask wrappers, copies)."""
    index = {id(layer): i for i, layer in enumerate(iter_layers(backbone))}
    stand_ins = stand_ins or {}
    indices = tuple(index.get(id(stand_ins.get(id(layer), layer))) for layer in iter_layers(model))
    model.backbone_source = dataclasses.replace(source, indices=indices)
    return model


def layer_copies(source, layers, values=lambda layer: layer.get_weights()):
    """`{id(layer): copy}` for `[(layer, index)]`, layers of the backbone `source` describes (or
    stand-ins for them) at those indices of `iter_layers(backbone)`, each copy taken from one copy
    of the backbone made by Keras' own contract (`keras.saving`), so that a layer whose own config
    does not rebuild it (keras-hub 0.32's Qwen 3 decoder, MiT encoder) is copied all the same,
    weights `values(layer)`, frozen as `layer` is. Raises ValueError (one line naming the class)
    where the backbone does not load back alike.
    """
    if not layers:
        return {}
    inner, copies = list(iter_layers(source.copy())), {}
    for layer, index in layers:
        weights = values(layer)
        copy = inner[index] if index is not None and index < len(inner) else None
        shapes = [tuple(w.shape) for w in getattr(copy, "weights", ())]
        if type(copy) is not type(layer) or shapes != [tuple(np.shape(v)) for v in weights]:
            raise ValueError(f"{source.class_name} {source.name!r} loads back from its keras.saving config with "
                             f"{layer.name!r} ({type(layer).__name__}) other than it was (weights of shapes "
                             f"{shapes}); it cannot be copied to bake or adapt")
        copy.set_weights(weights)
        copy.trainable = layer.trainable  # frozen as its source: keras-hub 0.32's DeepLab pooling
        copies[id(layer)] = copy  # runs its BatchNormalization in training mode otherwise
    return copies


def _merged(layer):
    """A LoRA copy's weights without its adapters, each adapted kernel merged (`W + (alpha/r) A B`,
    Keras' `kernel` property), in the order of a fresh layer of the same config."""
    merged = {}
    for target in lora_targets(layer):
        if getattr(target, "lora_enabled", False):
            merged[id(next(w for w in target.weights if is_kernel(w)))] = target.kernel
    adapters = {id(w) for w in lora_adapters(layer)}
    return [merged.get(id(w), w) for w in layer.weights if id(w) not in adapters]


def bake(model):
    """A plain Keras model with each `W ⊙ m` folded into an ordinary layer.

    The result has no mask or binarizer ops, computes the same outputs as `model`
    (the masks are exactly 0, 1 or -1, so the products are exact) and can be saved or
    exported without this library. Unmasked layers are shared with `model`; each masked one
    (and each LoRA copy, its adapters merged) is replaced by its layer in one copy of the
    backbone made through `keras.saving` (`layer_copies`).

    Example:
    >>> import tf_piggyback as pb
    >>> plain = bake(pb.piggyback(pb.digits_backbone(), num_classes=10))
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
    values, where = {}, []
    for position, layer in enumerate(iter_layers(model)):
        if lora_adapters(layer):
            values[id(layer)] = (None, layer, [keras.ops.convert_to_numpy(w) for w in _merged(layer)])
        elif isinstance(layer, MaskedWrapper):
            products = {k.path: k_m for k, k_m in zip(layer.kernels, layer.masked_kernels())}
            values[id(layer)] = (layer, layer.layer, [keras.ops.convert_to_numpy(products.get(w.path, w))
                                                      for w in layer.layer.weights])
        else:
            continue
        where.append((values[id(layer)][1], position))
    source = getattr(model, "backbone_source", None)
    if where and source is None:
        raise ValueError(f"model {model.name!r} was not built by piggyback or lora (it has no backbone_source); "
                         "build the task with them or load_task")
    weights = {id(layer): arrays for _, layer, arrays in values.values()}
    copies = layer_copies(source, [(layer, source.indices[position]) for layer, position in where],
                          lambda layer: weights[id(layer)])
    baked = []

    def clone(layer):
        if id(layer) not in values:
            return layer
        wrapper, source, _ = values[id(layer)]
        copies[id(source)].trainable = False  # a plain model for inference, as the frozen backbone
        baked.append((wrapper, copies[id(source)]))
        return copies[id(source)]

    result = keras.models.clone_model(model, clone_function=clone, recursive=True)
    return result, [(wrapper, plain) for wrapper, plain in baked if wrapper is not None]
