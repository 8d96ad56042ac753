"""Pixel readers of detection splits: tf.data map functions from an example index (int64
scalar tensor) to a uint8 [h, w, 3] image, for image files, in-memory arrays and tfds data
sources. `subset` re-indexes one onto a subset of its images."""

import numpy as np
import tensorflow as tf


def _decode(encoded):
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


class FileReader:
  """Encoded images (JPEG, PNG, ...) on disk, decoded by TensorFlow."""

  def __init__(self, paths):
    self.paths = np.asarray(paths, dtype=object)

  def subset(self, where):
    return FileReader(self.paths[where])

  def read(self, index):
    return _decode(tf.io.read_file(tf.gather(tf.constant(self.paths.astype(str)), index)))


class ArrayReader:
  """uint8 images in memory, all of one size: [N, h, w] (grey, repeated to RGB) or [N, h, w, 3]."""

  def __init__(self, images: np.ndarray):
    self.images = images

  def subset(self, where):
    return ArrayReader(self.images[where])

  def read(self, index):
    image = tf.numpy_function(lambda i: self.images[i], [index], tf.uint8, stateful=False)
    image = tf.reshape(image, self.images.shape[1:3] + (-1,))
    return tf.image.grayscale_to_rgb(image) if self.images.ndim == 3 else image


class DataSourceReader:
  """The encoded 'image' of a random-access tfds data source (opened with SkipDecoding)."""

  def __init__(self, source, positions=None):
    self.source = source
    self.positions = np.arange(len(source)) if positions is None else positions

  def subset(self, where):
    return DataSourceReader(self.source, self.positions[where])

  def read(self, index):
    encoded = tf.numpy_function(lambda i: self.source[int(self.positions[i])]["image"], [index],
                                tf.string, stateful=False)
    return _decode(tf.reshape(encoded, []))
