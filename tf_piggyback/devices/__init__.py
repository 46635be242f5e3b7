"""Tasks on phones and microcontrollers (BUILD.md, "Layout"): TFLite / LiteRT export (`tflite`),
the many-task phone file and its bytes (`phone`, `phonebytes`, `phoneint8`) and on-device training
(`ondevice`). Builds on `core`, `data` and `serving`'s signatures.
"""
