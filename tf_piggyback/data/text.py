"""keras-hub presets and text datasets from the CLI (BUILD.md, "keras-hub presets and text tasks").

`--backbone=` takes a keras-hub preset: a Kaggle or Hugging Face handle (`kaggle://keras/bert/
keras/bert_base_en_uncased`, `hf://...`) or a local preset folder, as `save_to_preset` writes one
(`config.json` naming a keras-hub class). A text preset's preprocessor (its tokenizer, packer and
sequence length) turns a text dataset into the backbone's inputs by name; an image preset's image
converter's scale and offset go inside the backbone, so its tasks take raw pixels as every
backbone here does.

Text datasets: `tfds:NAME[/CONFIG]` for a TensorFlow Datasets set with one text and one class
label feature (`imdb_reviews`, `glue/sst2`, `ag_news_subset`), and `folder:PATH` with one
sub-folder per class of `.txt` files, one example a file.

Reference: §3 (one frozen backbone, a mask per task), which holds for any backbone.
"""

import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.data.sources import Splits, folder_files, permuted, tfds_builder, tfds_split_names

HANDLES = ("kaggle://", "hf://")
TOKENIZE_BATCH = 256  # texts tokenized per preprocessor call


def is_preset(name):
    """Whether `--backbone=name` names a keras-hub preset: a handle, or a folder holding `config.json`."""
    return name.startswith(HANDLES) or os.path.isfile(os.path.join(name, "config.json"))


def load_preset(name, sequence_length=None):
    """`(backbone, preprocessor)` of a keras-hub preset (`is_preset`).

    A text backbone comes as it is, with its preprocessor (`text_preprocessor`). An image
    backbone comes behind its preset's image converter's scale and offset
    (`with_image_converter`), taking raw 0-255 pixels at the converter's size; its preprocessor
    is None.
    """
    import keras_hub

    try:
        backbone = keras_hub.models.Backbone.from_preset(name)
    except Exception as e:  # keras-hub raises ValueError, FileNotFoundError, kagglehub's errors...
        raise ValueError(f"--backbone={name} is no keras-hub preset keras-hub can load "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(backbone.input, dict):
        return backbone, text_preprocessor(name, sequence_length)
    if sequence_length is not None:
        raise ValueError(f"--sequence_length applies to text presets; {name} is an image backbone")
    return with_image_converter(backbone, image_converter(name), name), None


def text_preprocessor(name, sequence_length=None):
    """A text preset's preprocessor: its `TextClassifierPreprocessor` (BERT, RoBERTa, ...), else
    its `CausalLMPreprocessor` (Llama, Gemma, ... have no classifier), at `sequence_length`
    tokens (default: the preset's)."""
    import keras_hub

    errors = []
    for kind in (keras_hub.models.TextClassifierPreprocessor, keras_hub.models.CausalLMPreprocessor):
        try:
            preprocessor = kind.from_preset(name)
        except ValueError as e:
            errors.append(str(e).splitlines()[0])
            continue
        if sequence_length is not None:
            preprocessor.sequence_length = int(sequence_length)
        return preprocessor
    raise ValueError(f"preset {name} has no text preprocessor keras-hub can load ({errors[-1]})")


def image_converter(name):
    """An image preset's `ImageConverter` (its size, scale and offset)."""
    import keras_hub

    try:
        converter = keras_hub.models.ImageClassifierPreprocessor.from_preset(name).image_converter
    except ValueError as e:
        raise ValueError(f"preset {name} has no image converter keras-hub can load ({str(e).splitlines()[0]})") from None
    if converter is None or converter.image_size is None:
        raise ValueError(f"preset {name}'s image converter has no image size; its tasks need one")
    return converter


def with_image_converter(backbone, converter, name):
    """`backbone` behind `converter`'s scale and offset: raw pixels of the converter's size in.

    The converter's arithmetic as a `keras.layers.Rescaling`, not the converter itself: a model
    with keras-hub 0.32's `ImageConverter` (a `PreprocessingLayer`) in front of a backbone ran the
    backbone's BatchNormalization in training mode when called without `training=False`
    (measured: outputs 4.4 apart on a small ResNet, and each call moved its statistics). Inputs
    come at the converter's size, so its resizing is the identity."""
    if converter.data_format != "channels_last":
        raise ValueError(f"preset {name}: its image converter is {converter.data_format}; tasks here take channels_last")
    inputs = keras.Input((*converter.image_size, backbone.inputs[0].shape[-1]), name="image")
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    scaled = keras.layers.Rescaling(scale, offset, name="image_converter")(inputs)
    return keras.Model(inputs, backbone(scaled), name=f"{backbone.name}_with_converter")


def preprocess(preprocessor, texts):
    """The preprocessor's token inputs of a batch of strings (`token_ids`, `padding_mask`, ...):
    a `CausalLMPreprocessor` gives them through `generate_preprocess` (no labels)."""
    import keras_hub

    if isinstance(preprocessor, keras_hub.models.CausalLMPreprocessor):
        return preprocessor.generate_preprocess(texts)
    return preprocessor(texts)


def tokenize(preprocessor, texts, input_names):
    """`{input name: int32 array [N, sequence_length]}` of `texts` (strings), as the backbone
    takes them. Tokenized eagerly, in batches (keras-hub's Python tokenizers: no
    `tensorflow-text` needed to train)."""
    parts = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        out = preprocess(preprocessor, tf.constant(list(texts[start:start + TOKENIZE_BATCH])))
        parts.append({k: np.asarray(keras.ops.convert_to_numpy(v)).astype(np.int32) for k, v in out.items()})
    missing = sorted(set(input_names) - set(parts[0])) if parts else []
    if missing:
        raise ValueError(f"the preprocessor gives {', '.join(sorted(parts[0]))}; the backbone also takes "
                         f"{', '.join(missing)}")
    return {k: np.concatenate([p[k] for p in parts]) for k in input_names}


def text_examples(spec, split_seed):
    """`(class names, (train texts, labels), (test texts, labels))` of a text dataset spec."""
    kind, _, arg = spec.partition(":")
    if kind == "folder":
        names, (files, labels), (test_files, test_labels) = folder_files(arg, split_seed, kind="text")

        def read(paths):
            return np.array([pathlib.Path(p).read_text(encoding="utf-8") for p in paths], dtype=object)

        return names, (read(files), labels), (read(test_files), test_labels)
    if kind == "tfds":
        return _tfds_text(arg)
    raise ValueError(f"a text backbone reads tfds:NAME[/CONFIG] or folder:PATH of .txt files. Received: --dataset={spec}")


def _tfds_text(name):
    import tensorflow_datasets as tfds

    builder = tfds_builder(name)
    features = builder.info.features
    text = [key for key, feature in features.items() if isinstance(feature, tfds.features.Text)]
    label = [key for key, feature in features.items() if isinstance(feature, tfds.features.ClassLabel)]
    if len(text) != 1 or len(label) != 1:
        raise ValueError(f"tfds:{name} has text features {text} and label features {label}; a text task reads "
                         "sets with one of each")
    splits = []
    for split in tfds_split_names(name, builder):
        try:
            examples = tfds.as_numpy(tfds.load(name, split=split))
        except Exception as e:
            raise ValueError(f"could not load tfds:{name} ({type(e).__name__}: {e}); download it with "
                             f"`tfds build {name}` or set TFDS_DATA_DIR") from None
        texts, labels = [], []
        for example in examples:
            texts.append(example[text[0]].decode("utf-8", errors="replace"))
            labels.append(int(example[label[0]]))
        labels = np.array(labels, np.int64)
        if labels.size and (labels < 0).all():
            raise ValueError(f"tfds:{name} split {split!r} has no labels (private test labels)")
        splits.append((np.array(texts, dtype=object), labels))
    return list(features[label[0]].names), splits[0], splits[1]


def text_splits(spec, preprocessor, input_names, split_seed):
    """`Splits` of a text dataset, each example `({input name: int32 [sequence_length]}, label)`,
    tokenized once by `preprocessor`."""
    names, (texts, labels), (test_texts, test_labels) = text_examples(spec, split_seed)
    if not len(texts) or not len(test_texts):
        raise ValueError(f"{spec} has {len(texts)} training and {len(test_texts)} test texts; it needs both")
    train, test = tokenize(preprocessor, texts, input_names), tokenize(preprocessor, test_texts, input_names)

    def examples(inputs, y):
        return tf.data.Dataset.from_tensor_slices((inputs, y))

    def epoch(seed):  # every epoch in an order of its own (`datasets.Splits.epoch`)
        y, *values = permuted(seed, labels, *train.values())
        return examples(dict(zip(train, values)), y)

    return Splits(examples(train, labels), examples(test, test_labels), names, len(labels), len(test_labels),
                  epoch=epoch)
