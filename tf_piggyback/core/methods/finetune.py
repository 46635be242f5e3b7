"""Finetuning (§4, Table 2's "Individual Networks"): a whole trainable copy of the backbone per task,
saved as a Keras model (`model.keras`), SGD with momentum at lr 1e-3."""

import os

import keras

from tf_piggyback.core.methods.base import Method, momentum_sgd, register
from tf_piggyback.core.surgery import add_head, feature_model, iter_layers, task_head


def finetune(backbone, num_classes, *, feature_layer=None, head=None):
    """The "Individual Networks" baseline: a trainable copy of the whole backbone and a head
    (`Dense`, or `head` as for `piggyback`).

    The backbone itself is not touched. Reference: §4, Table 2 (SGD momentum, lr 1e-3).
    """
    if type(backbone).__module__.split(".")[0] == "keras":  # functional or Sequential: its features, layer by layer
        features = feature_model(backbone, feature_layer)
        body = keras.models.clone_model(features, recursive=True)
        body.set_weights(features.get_weights())
    else:  # a model class of its own (keras-hub's backbones) rebuilds from its arguments; nested whole,
        # the task's model.keras stores it so (its layers' own configs may not load: keras-hub 0.32's ViT)
        own = type(backbone).from_config(backbone.get_config())
        own.set_weights(backbone.get_weights())
        inputs = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name), own.input)
        body = feature_model(keras.Model(inputs, own(inputs), name=backbone.name), feature_layer)
    for layer in iter_layers(body):
        layer.trainable = True
    return add_head(body, num_classes, name=f"finetune_{backbone.name}", head=task_head(head)[0])


@register
class Finetune(Method):
    name = "finetune"
    output = "model.keras"
    storage = "own"
    learning_rates = ("finetune_lr",)

    def build(self, backbone, num_classes, config, head=None):
        return finetune(backbone, num_classes, feature_layer=config.feature_layer, head=head)

    def optimizers(self, model, config, steps_per_epoch):
        return momentum_sgd(model, config, steps_per_epoch)

    def save(self, model, path, *, class_names, metrics):
        tmp = os.path.join(os.path.dirname(path), ".model.tmp.keras")  # Keras saves by the suffix
        model.save(tmp)
        os.replace(tmp, path)
