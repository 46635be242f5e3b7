"""What tasks are trained on (BUILD.md, "Layout"): TensorFlow Datasets and image folders as
`tf.data` splits (`sources`, `datasets`), image decoding and augmentation (`images`), and text
datasets and keras-hub presets' preprocessors (`text`). Imports nothing of the package but itself.
"""
