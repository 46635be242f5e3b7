r"""Writes small keras-hub text presets (random weights) and a text folder to train tasks on.

python scripts/make_text_presets.py --output=runs/text
python scripts/train.py --backbone=runs/text/bert --feature_layer=sequence_output \
    --dataset=folder:runs/text/topics --head_lr=1e-3 --model_dir=runs/text/bert_topics

Presets need downloads, so each is built as `save_to_preset` writes a real one: a backbone of 2
layers, hidden size 16 and 16 tokens, and its preprocessor over a vocabulary of this script's
words: `bert` and `distil_bert` (WordPiece, a `TextClassifierPreprocessor`), `llama` (a
SentencePiece model trained here on the folder's sentences, a `CausalLMPreprocessor`: Llama has
no classifier preprocessor). `topics/` holds one sub-folder per topic of `.txt` files: sentences
of shared words with two of the topic's own among them. `tests/test_text.py` and
`scripts/text_table.py` use them. The output belongs under runs/ (ignored by git).
"""

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info/warning logs

import numpy as np
from absl import app, flags

from tf_piggyback.cli import user_errors

FLAGS = flags.FLAGS
TOPICS = {"sport": ["goal", "team", "match", "score", "coach"], "music": ["song", "band", "album", "guitar", "tune"],
          "food": ["bread", "soup", "cheese", "salad", "spice"], "weather": ["rain", "snow", "wind", "storm", "sun"]}
SHARED = ["the", "a", "was", "very", "good", "bad", "new", "old", "today", "and", "we", "they", "saw", "liked"]
FAMILIES = ("bert", "distil_bert", "llama")


def define_flags():
    flags.DEFINE_string("output", None, "Folder to write the presets and topics/ into.")
    flags.DEFINE_integer("per_topic", 60, "Text files per topic.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and the sentences.")
    flags.mark_flag_as_required("output")


def sentences(count, seed):
    """`count` sentences per topic: 6 shared words and 2 of the topic's, shuffled."""
    rng = np.random.default_rng(seed)
    return {topic: [" ".join(rng.permutation([*rng.choice(SHARED, 6), *rng.choice(words, 2)])) for _ in range(count)]
            for topic, words in TOPICS.items()}


def write_presets(output, corpus, seed):
    import keras
    import keras_hub
    import sentencepiece

    words = SHARED + [w for topic in TOPICS.values() for w in topic]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    encoder = dict(vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
                   max_sequence_length=16)
    keras.utils.set_random_seed(seed)
    keras_hub.models.BertBackbone(**encoder).save_to_preset(os.path.join(output, "bert"))
    keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True), sequence_length=16
    ).save_to_preset(os.path.join(output, "bert"))
    keras_hub.models.DistilBertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=16).save_to_preset(os.path.join(output, "distil_bert"))
    keras_hub.models.DistilBertTextClassifierPreprocessor(
        keras_hub.models.DistilBertTokenizer(vocabulary=vocabulary, lowercase=True), sequence_length=16
    ).save_to_preset(os.path.join(output, "distil_bert"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=len(words) + 4, model_type="word", pad_id=0,
        unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        minloglevel=2)
    tokenizer = keras_hub.models.LlamaTokenizer(proto=model.getvalue())
    keras_hub.models.LlamaBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_query_heads=2,
                                   num_key_value_heads=1, hidden_dim=16, intermediate_dim=32
                                   ).save_to_preset(os.path.join(output, "llama"))
    keras_hub.models.LlamaCausalLMPreprocessor(tokenizer, sequence_length=16).save_to_preset(
        os.path.join(output, "llama"))


@user_errors
def main(argv):
    del argv
    by_topic = sentences(FLAGS.per_topic, FLAGS.seed)
    for topic, texts in by_topic.items():
        os.makedirs(os.path.join(FLAGS.output, "topics", topic), exist_ok=True)
        for i, text in enumerate(texts):
            with open(os.path.join(FLAGS.output, "topics", topic, f"{i}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
    write_presets(FLAGS.output, [t for texts in by_topic.values() for t in texts], FLAGS.seed)
    print(f"{FLAGS.output}: presets {', '.join(FAMILIES)}; topics/ ({len(TOPICS)} x {FLAGS.per_topic} texts)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
