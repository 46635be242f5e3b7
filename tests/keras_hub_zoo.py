"""keras-hub backbones built from small configs with random weights (presets need downloads), and
inputs of the kind each declares: the families `test_keras_hub.py` and the sweep
(`test_backbone_sweep.py`, `scripts/backbone_table.py`) build."""

import keras
import numpy as np

IMAGE = 32
TOKENS = 16
VOCABULARY = 100


def images(count, seed=0, size=IMAGE):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def tokens(count, seed=0, segments=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCABULARY, (count, TOKENS)).astype("int32")
    mask = (np.arange(TOKENS) < rng.integers(8, TOKENS + 1, (count, 1))).astype("int32")
    return {"token_ids": ids, "padding_mask": mask, **({"segment_ids": np.zeros_like(ids)} if segments else {})}


def inputs_for(backbone, count, seed=0):
    """Inputs `backbone` declares: an image batch, or tokens by the names of its inputs."""
    if isinstance(backbone.input, dict):
        return {k: v for k, v in tokens(count, seed).items() if k in backbone.input}
    return images(count, seed, backbone.inputs[0].shape[1])


def _mit():
    return dict(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[2, 1],
                max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
                image_shape=(IMAGE, IMAGE, 3), hidden_dims=[8, 16])


_DECODER = dict(vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=32,
                intermediate_dim=64)

# class name: a function giving its small config (nested backbones built inside it).
CONFIGS = {
    "DeiTBackbone": lambda: dict(image_shape=(IMAGE, IMAGE, 3), patch_size=8, num_layers=2, num_heads=2,
                                 hidden_dim=32, intermediate_dim=64),
    "SwinTransformerBackbone": lambda: dict(image_shape=(IMAGE, IMAGE, 3), embed_dim=16, depths=[1, 1],
                                            num_heads=[2, 2], window_size=4, patch_size=2),
    "Llama3Backbone": lambda: dict(_DECODER),
    "Qwen3Backbone": lambda: dict(_DECODER, head_dim=16),
    "MiTBackbone": _mit,
    "SegFormerBackbone": lambda: dict(image_encoder=build("MiTBackbone"), projection_filters=16),
    "SigLIPVisionEncoder": lambda: dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64,
                                        image_shape=(IMAGE, IMAGE, 3)),
}


def build(name, seed=7):
    """keras-hub's `name` from its small config, seeded: the same weights in every process."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    config = CONFIGS[name]()
    keras.utils.set_random_seed(seed)
    return getattr(keras_hub.models, name)(**config)
