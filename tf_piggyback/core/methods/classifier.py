"""Classifier-only (§4, Table 2's "Classifier Only"): the frozen, shared backbone and a new head."""

import keras

from tf_piggyback.core.fingerprint import backbone_entry
from tf_piggyback.core.methods.base import Method, register
from tf_piggyback.core.surgery import TaskSpec, add_head, feature_model, iter_layers, owned_layers, task_head


def classifier_only(backbone, num_classes, *, feature_layer=None, head=None):
    """The "Classifier Only" baseline: the frozen, shared backbone and a new linear head (or
    `head`, as for `piggyback`).

    Reference: §4, Table 2.
    """
    features = feature_model(backbone, feature_layer)
    for layer in iter_layers(features):
        layer.trainable = False
    body = keras.models.clone_model(features, clone_function=lambda layer: layer, recursive=True)
    head, stored = task_head(head)
    model = add_head(body, num_classes, name=f"classifier_{backbone.name}", head=head)
    model.task_spec = TaskSpec("classifier", backbone_entry(backbone), int(num_classes),
                               {"feature_layer": feature_layer, **stored}, owned_layers(head))
    return model


@register
class Classifier(Method):
    name = "classifier"
    learning_rates = ("head_lr",)

    def build(self, backbone, num_classes, config, head=None):
        return classifier_only(backbone, num_classes, feature_layer=config.feature_layer, head=head)

    def load(self, backbone, manifest):
        return classifier_only(backbone, manifest["num_classes"], **manifest["options"])
