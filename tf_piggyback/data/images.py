"""Image operations of the input pipeline: fitting images to a backbone, the paper protocol's
scaling and crops (§4, following the official code), and training augmentation. Each takes and
returns raw 0-255 pixels; the random ones are stateless, seeded, so a resumed run repeats them."""

import tensorflow as tf

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)  # a normalized box `[ymin, xmin, ymax, xmax]` over all of an image


def paper_scale(shape):
    """The shorter side images are scaled to before a crop of `shape` (256 for 224 px)."""
    return int(round(max(shape[:2]) * 256 / 224))


def scale_shorter_side(image, label, side, channels):
    """`image` (float32, `channels`) scaled so its shorter side is `side`, aspect kept."""
    image = convert_channels(tf.cast(image, tf.float32), channels)
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = side / tf.reduce_min(size)
    new = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), side)
    return tf.image.resize(image, new, method="bilinear"), tf.cast(label, tf.int64)


def center_crop(image, label, side, shape):
    """The paper protocol's test image: scaled to `side` (shorter side), then the center `shape`."""
    image, label = scale_shorter_side(image, label, side, shape[-1])
    size = tf.shape(image)[:2]
    top, left = (size[0] - shape[0]) // 2, (size[1] - shape[1]) // 2
    return tf.ensure_shape(image[top:top + shape[0], left:left + shape[1]], shape), label


def to_uint8(image, label):
    """What the training cache keeps: 0-255 pixels as uint8 (a quarter of float32's bytes)."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8), label


def to_float(image, label):
    """uint8 pixels back to float32, as every model takes them."""
    return tf.cast(image, tf.float32), label


def convert_channels(image, wanted):
    """`image` with `wanted` channels: grayscale and RGB convert into each other; others raise."""
    channels = image.shape[-1]
    if channels != wanted and not {channels, wanted} <= {1, 3}:
        raise ValueError(f"the dataset's images have {channels} channels and the backbone takes {wanted}; "
                         "only grayscale (1) and RGB (3) are converted into each other")
    if channels == 1 and wanted == 3:
        return tf.image.grayscale_to_rgb(image)
    if channels == 3 and wanted == 1:
        return tf.image.rgb_to_grayscale(image)
    return image


def fit_image(image, label, shape):
    """`image` resized to `shape` (and its channels converted); a per-pixel label map follows."""
    image = convert_channels(tf.cast(image, tf.float32), shape[-1])
    if tuple(image.shape[:2]) != shape[:2]:
        image = tf.image.resize(image, shape[:2], method="bilinear")
        if label.shape.rank == 2:  # a per-pixel map follows its image, without new classes
            label = tf.image.resize(label[..., None], shape[:2], method="nearest")[..., 0]
    return tf.ensure_shape(image, shape), tf.cast(label, tf.int64)


def augment(image, seed):
    """The paper's training augmentation (§4): scale up by 256/224, random crop back, random
    horizontal flip. Stateless: `seed` (a shape-[2] integer tensor) fixes the crop and the flip."""
    height, width = image.shape[0], image.shape[1]
    larger = tf.image.resize(image, [round(height * 256 / 224), round(width * 256 / 224)], method="bilinear")
    cropped = tf.image.stateless_random_crop(larger, image.shape, seed=seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=seed[::-1])


def box_pixels(size, box):
    """`(top, left, bottom, right)` pixels of a normalized box `[ymin, xmin, ymax, xmax]` (tfds'
    `bbox`) in an image of `size` (height, width), at least one pixel each way."""
    size = tf.cast(size, tf.float32)
    top, left = tf.cast(tf.round(box[0] * size[0]), tf.int32), tf.cast(tf.round(box[1] * size[1]), tf.int32)
    bottom = tf.maximum(tf.cast(tf.round(box[2] * size[0]), tf.int32), top + 1)
    right = tf.maximum(tf.cast(tf.round(box[3] * size[1]), tf.int32), left + 1)
    return top, left, bottom, right


def _crop_window(image_size, seed):
    """`(begin, size)` of the paper protocol's random crop in an image of `image_size` `[h, w, c]`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size, bounding_boxes=tf.constant([[WHOLE_IMAGE]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size


def _resized_and_flipped(crop, seed, shape):
    crop = tf.image.resize(tf.cast(crop, tf.float32), shape[:2], method="bilinear")
    return tf.ensure_shape(tf.image.stateless_random_flip_left_right(crop, seed=seed[::-1]), shape)


def random_sized_crop(image, seed, shape):
    """The paper protocol's training crop: a random part of 8-100% of the image's area with an
    aspect ratio in [3/4, 4/3], resized to `shape`, and a random horizontal flip (the official
    code's `RandomSizedCrop(224)` and `RandomHorizontalFlip`). Stateless: `seed` (shape [2])
    fixes both, so a resumed run repeats its epochs."""
    begin, size = _crop_window(tf.shape(image), seed)
    return _resized_and_flipped(tf.slice(image, begin, size), seed, shape)


def decode_random_sized_crop(image, box, seed, shape):
    """`random_sized_crop` of the part of `image` inside `box` (normalized `[ymin, xmin, ymax,
    xmax]`; `WHOLE_IMAGE`: all of it), straight from the file's bytes: for a JPEG only the crop's
    window is decoded (`tf.io.decode_and_crop_jpeg`; a crop is 8-100% of the image, so most of
    the decoding is skipped), other formats are decoded whole. `image` may also be decoded pixels.
    The same `seed` gives the same crop as `random_sized_crop` of the decoded, boxed image (with
    4:2:0 chroma subsampling the window's edge pixels can differ a little in colour: libjpeg
    upsamples it from inside the window)."""
    channels = shape[-1]

    def from_pixels(pixels):
        pixels = convert_channels(tf.cast(pixels, tf.float32), channels)
        top, left, bottom, right = box_pixels(tf.shape(pixels)[:2], box)
        return random_sized_crop(pixels[top:bottom, left:right], seed, shape)

    def from_jpeg():
        top, left, bottom, right = box_pixels(tf.image.extract_jpeg_shape(image)[:2], box)
        begin, size = _crop_window(tf.stack([bottom - top, right - left, channels]), seed)
        window = tf.stack([top + begin[0], left + begin[1], size[0], size[1]])
        return _resized_and_flipped(tf.io.decode_and_crop_jpeg(image, window, channels=channels), seed, shape)

    if image.dtype != tf.string:
        return from_pixels(image)
    return tf.cond(tf.io.is_jpeg(image), from_jpeg,
                   lambda: from_pixels(tf.io.decode_image(image, channels=channels, expand_animations=False)))
