"""TFDS input pipelines, preprocessing and the built-in offline datasets."""
