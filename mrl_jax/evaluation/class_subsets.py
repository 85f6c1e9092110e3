"""The 200-class subsets of ImageNet-A and ImageNet-R, as WordNet IDs.

Both datasets label images with ImageNet-1K classes (TFDS too), but cover only 200 of them; as
in their papers and the official MRL evaluation, logits are restricted to those 200 classes
before the argmax. The classes are given by WordNet ID (the datasets' own definition, Hendrycks
et al. 2021a/b) and mapped to ImageNet-1K indices through the `imagenet2012/labels.txt` shipped
with TFDS (the sorted synsets that define TFDS's label order), so the indices follow whatever
label order the data uses.
"""

import functools
import json
import os

import numpy as np
import tensorflow_datasets as tfds

# TFDS dataset name -> WordNet IDs of its classes (the datasets' own lists, in a data file).
with open(os.path.join(os.path.dirname(__file__), "class_subsets.json")) as _f:
  CLASS_SUBSETS: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in json.load(_f).items()}


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The ImageNet-1K synsets in TFDS label order (index i = class i)."""
  path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(path) as f:
    return tuple(f.read().split())


def class_indices(dataset: str) -> np.ndarray | None:
  """Sorted ImageNet-1K indices of the dataset's classes, or None if it uses all 1000."""
  if dataset not in CLASS_SUBSETS:
    return None
  index = {w: i for i, w in enumerate(imagenet_wnids())}
  return np.asarray(sorted(index[w] for w in CLASS_SUBSETS[dataset]), np.int32)


def class_mask(dataset: str, num_classes: int) -> np.ndarray | None:
  """Boolean [num_classes] mask of the dataset's classes (None: no restriction)."""
  indices = class_indices(dataset)
  if indices is None:
    return None
  mask = np.zeros((num_classes,), bool)
  mask[indices] = True
  return mask
