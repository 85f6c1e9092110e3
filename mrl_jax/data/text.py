"""Text preprocessing: the one definition both readers call, with static shapes.

A batch of raw records (strings, as stored) becomes int32 arrays of fixed shape [B, L]
(L = config.text.max_length): `[CLS] tokens [SEP]`, truncated, padded with [PAD]; `input_mask`
is 1 on real tokens. Every random choice (an MLM mask, a crop window) comes from a numpy generator
seeded by (config seed, the example's position in the global stream), so the same record at
the same position gives the same arrays under either reader, on any number of processes, and a
resumed run draws what an uninterrupted one would.

Tasks (what a batch holds):
- `mlm` (BERT's masked LM, Devlin et al. 2019 §3.1): one text per example; a text longer than
  L - 2 tokens is cut to a random window of that length (a fresh window each epoch); 15 % of
  its tokens (at most `max_predictions`, at least 1) are chosen, of which 80 % become [MASK],
  10 % a random token, 10 % stay. Adds `masked_positions`, `masked_ids` [B, P] and
  `masked_weights` (1 for a real prediction, 0 for padding).
- `pair`: two texts per example (`anchor`, `positive` features, or `crop`: two random windows
  of one text, Contriever's independent cropping), each tokenized: `anchor_*` and `positive_*`.
- `embed`: every configured text key tokenized as is (evaluation, inference; no randomness); a
  blank text is `[CLS] [SEP]`, as sentence-transformers embeds it (training refuses it).
A scalar `label` / `score` feature is passed through.
"""

import dataclasses

import numpy as np

from mrl_jax.data import tokenizers as tokenizers_lib
from mrl_jax.errors import ConfigError

TASKS = ("mlm", "pair", "embed")
PAIR_MODES = ("columns", "crop")


def _as_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _as_str(value.item())
  return str(value)


@dataclasses.dataclass(frozen=True)
class TextPreprocess:
  """Raw records -> a numpy batch of static shapes (module docstring)."""
  tokenizer: tokenizers_lib.Tokenizer
  task: str
  keys: tuple[str, ...]  # text features read: mlm/crop: (text,); columns: (anchor, positive)
  max_length: int
  label_key: str | None = None
  pair_mode: str = "columns"
  crop_tokens: int = 0  # crop: each window's length in tokens (0: max_length - 2)
  mask_rate: float = 0.15
  max_predictions: int = 20
  random_crop: bool = True  # mlm: a random window of long texts (eval: the first one)

  def __post_init__(self):
    if self.task not in TASKS:
      raise ConfigError(f"unknown text task {self.task!r}; allowed: {list(TASKS)}")
    if self.max_length < 3:
      raise ConfigError(f"config.text.max_length={self.max_length}; allowed: >= 3 ([CLS] "
                        "token [SEP])")
    if self.pair_mode not in PAIR_MODES:
      raise ConfigError(f"config.text.pair_mode={self.pair_mode!r}; allowed: "
                        f"{list(PAIR_MODES)}")
    if self.task == "mlm" and not 1 <= self.max_predictions <= self.max_length:
      raise ConfigError(f"config.text.max_predictions={self.max_predictions}; allowed: 1 .. "
                        f"max_length ({self.max_length})")

  @property
  def body(self) -> int:
    return self.max_length - 2  # room for [CLS] and [SEP]

  def _frame(self, ids_list) -> dict[str, np.ndarray]:
    """[CLS] ids [SEP], padded: input_ids, segment_ids, input_mask int32 [B, L]."""
    t = self.tokenizer
    b, length = len(ids_list), self.max_length
    input_ids = np.full((b, length), t.pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, ids in enumerate(ids_list):
      row = [t.cls_id, *ids[:self.body], t.sep_id]
      input_ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "segment_ids": np.zeros_like(input_ids), "input_mask": mask}

  def _window(self, ids, size, rng):
    if len(ids) <= size:
      return ids
    start = int(rng.integers(0, len(ids) - size + 1)) if rng is not None else 0
    return ids[start:start + size]

  def _mlm(self, ids_list, rngs) -> dict[str, np.ndarray]:
    windows = [self._window(ids, self.body, rng if self.random_crop else None)
               for ids, rng in zip(ids_list, rngs)]
    out = self._frame(windows)
    b, p = len(windows), self.max_predictions
    positions = np.zeros((b, p), np.int32)
    targets = np.zeros((b, p), np.int32)
    weights = np.zeros((b, p), np.float32)
    t = self.tokenizer
    for i, (ids, rng) in enumerate(zip(windows, rngs)):
      n = len(ids[:self.body])
      if not n:
        continue
      count = min(p, max(1, int(round(n * self.mask_rate))))
      chosen = np.sort(rng.choice(n, count, replace=False)) + 1  # +1: after [CLS]
      roll = rng.random(count)
      random_ids = rng.integers(0, t.vocab_size, count)
      positions[i, :count] = chosen
      targets[i, :count] = out["input_ids"][i, chosen]
      weights[i, :count] = 1.0
      replaced = np.where(roll < 0.8, t.mask_id,
                          np.where(roll < 0.9, random_ids, out["input_ids"][i, chosen]))
      out["input_ids"][i, chosen] = replaced
    out.update(masked_positions=positions, masked_ids=targets, masked_weights=weights)
    return out

  def __call__(self, records: list[dict], positions, seed: int) -> dict[str, np.ndarray]:
    """records: raw feature dicts; positions: each example's global stream position (its
    random draws); seed: config.seed (0 for evaluation)."""
    rngs = [np.random.default_rng([int(seed), max(int(p), 0), 7]) for p in positions]
    texts = {k: [_as_str(r[k]) for r in records] for k in self.keys}
    for k, values in (texts.items() if self.task != "embed" else ()):
      empty = next((i for i, v in enumerate(values) if not v.strip()), None)
      if empty is not None:
        raise ConfigError(f"empty text in feature {k!r} (the example at stream position "
                          f"{int(positions[empty])}); every text must have a token")
    out = {}
    if self.task == "mlm":
      out = self._mlm(self.tokenizer.encode(texts[self.keys[0]]), rngs)
    elif self.task == "pair" and self.pair_mode == "crop":
      size = self.crop_tokens or self.body
      ids_list = self.tokenizer.encode(texts[self.keys[0]])
      for name in ("anchor", "positive"):
        framed = self._frame([self._window(ids, size, rng) for ids, rng in zip(ids_list, rngs)])
        out.update({f"{name}_{k}": v for k, v in framed.items()})
    else:
      names = ("anchor", "positive") if self.task == "pair" else self.keys
      for name, key in zip(names, self.keys):
        framed = self._frame(self.tokenizer.encode(texts[key]))
        out.update({f"{name}_{k}": v for k, v in framed.items()})
    if self.label_key is not None:
      values = np.asarray([np.asarray(r[self.label_key]) for r in records])
      out["label"] = values.astype(np.float32 if values.dtype.kind == "f" else np.int32)
    return out


def from_config(config, *, task: str, keys=None, label_key=None, train: bool = True
                ) -> TextPreprocess:
  """The TextPreprocess of config.text for a task ('mlm' | 'pair' | 'embed')."""
  text = config.text
  return TextPreprocess(
      tokenizer=tokenizers_lib.from_config(text, config.input.get("data_dir")), task=task,
      keys=tuple(keys if keys is not None else text.features), max_length=text.max_length,
      label_key=label_key, pair_mode=text.pair_mode, crop_tokens=text.crop_tokens,
      mask_rate=text.mask_rate, max_predictions=text.max_predictions, random_crop=train)
