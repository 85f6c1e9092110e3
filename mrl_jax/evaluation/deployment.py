"""The paper's adaptive-deployment uses and baselines, run by eval.py when config.eval asks.

Given the extracted database/query features and the trained heads: adaptive retrieval (with
funnels), adaptive classification cascades and the oracle, SVD/PCA/random baselines, and
n-shot nearest-class-mean accuracy. Each part returns plain dicts for results.json.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mrl_jax import models
from mrl_jax import validation
from mrl_jax.evaluation import adaptive_classification
from mrl_jax.evaluation import adaptive_retrieval
from mrl_jax.evaluation import baselines as baselines_lib
from mrl_jax.evaluation import fewshot
from mrl_jax.evaluation import neighbors
from mrl_jax.evaluation import probe


def head_predictions(model, params, batch_stats, z, z_flipped=None, block: int = 4096):
  """(confidence [S, N] = max softmax, prediction [S, N]) of every head, sizes ascending."""

  @jax.jit
  def fn(params, batch_stats, z, z_flipped):
    logits = model.head_logits(params, batch_stats, z)
    if z_flipped is not None:
      flipped = model.head_logits(params, batch_stats, z_flipped)
      logits = {m: logits[m] + flipped[m] for m in logits}
    sizes = sorted(logits)
    probs = jnp.stack([jax.nn.softmax(logits[m].astype(jnp.float32)) for m in sizes])
    return probs.max(-1), probs.argmax(-1)

  conf, pred = [], []
  for i in range(0, len(z), block):
    zf = None if z_flipped is None else np.asarray(z_flipped[i:i + block], np.float32)
    c, p = fn(params, batch_stats, np.asarray(z[i:i + block], np.float32), zf)
    conf.append(np.asarray(c))
    pred.append(np.asarray(p))
  return np.concatenate(conf, 1), np.concatenate(pred, 1)


def full_head(params, d: int):
  """(kernel [d, C], bias [C]) of the full-size head (MRL/FF: head_d; MRL-E: the tied one)."""
  heads = params["heads"]
  head = heads.get(f"head_{d}") if hasattr(heads, "get") else None
  if head is None and "tied" in heads:
    head = heads["tied"]
  if head is None:
    return None, None
  return np.asarray(head["kernel"]), np.asarray(head["bias"])


def run(config, model, params, batch_stats, database, queries, *, sizes, trained, search,
        knn_ks, retrieval_ks) -> dict:
  """The enabled extras for one query set; keys adaptive_retrieval, adaptive_classification,
  baselines, fewshot (each present when enabled)."""
  ev = config.eval
  out = {}
  d = database.z.shape[1]
  if database.labels.ndim == 2 or queries.labels.ndim == 2:
    skipped = [name for name, on in (("adaptive_classification", ev.adaptive_classification),
                                     ("baselines", ev.baselines), ("fewshot", ev.fewshot_shots))
               if on]
    if skipped:  # each is defined for single-label classification (the paper's)
      logging.warning("multi-label data: %s skipped (single-label evaluations)", skipped)
    ev = ev.copy_and_resolve_references()
    ev.update(adaptive_classification=False, baselines="", fewshot_shots="")
  if ev.adaptive_retrieval:
    funnels = adaptive_retrieval.parse_funnels(ev.shortlist_sizes, ev.rerank_sizes,
                                               ev.shortlist_k, ev.funnels, d)
    out["adaptive_retrieval"] = adaptive_retrieval.evaluate(
        funnels, database.z, database.labels, queries.z, queries.labels, search=search,
        num_classes=config.num_classes, retrieval_ks=[k for k in retrieval_ks if k <= 10] or
        [10])
  if ev.adaptive_classification and len(trained) > 1:
    conf, pred = head_predictions(model, params, batch_stats, queries.z, queries.z_flipped)
    caps = validation.parse_ints(ev.ac_caps, "config.eval.ac_caps")
    out["adaptive_classification"] = adaptive_classification.evaluate(
        conf, pred, queries.labels, list(trained), holdout=ev.ac_holdout, seeds=ev.ac_seeds,
        caps=caps)
  kinds = [k.strip() for k in ev.baselines.split(",") if k.strip()]
  if kinds:
    # At every nesting size, also for an FF-d (standard) model: the paper's baselines.
    out["baselines"] = baselines(kinds, params, database, queries,
                                 sizes=models.nesting_sizes(config), d=d,
                                 search=search, knn_ks=knn_ks, retrieval_ks=retrieval_ks,
                                 num_classes=config.num_classes, probe_steps=ev.probe_steps,
                                 probe_l2=ev.probe_l2)
  shots = validation.parse_ints(ev.fewshot_shots, "config.eval.fewshot_shots")
  if shots:
    out["fewshot"] = fewshot.evaluate(database.z, database.labels, queries.z, queries.labels,
                                      sizes, shots, draws=ev.fewshot_draws,
                                      num_classes=config.num_classes)
  return out


def baselines(kinds, params, database, queries, *, sizes, d, search, knn_ks, retrieval_ks,
              num_classes, probe_steps=200, probe_l2=1e-4) -> dict:
  """{kind: {size: metrics}} with the per-size metric names of results.json."""
  kernel, bias = full_head(params, d)
  cache = {}
  out = {}
  for kind in kinds:
    out[kind] = {}
    for m in sizes:
      project = baselines_lib.projector(kind, m, database=database.z, head_kernel=kernel,
                                        cache=cache)
      db_m = project(database.z).astype(np.float32)
      q_m = project(queries.z).astype(np.float32)
      metrics = neighbors.metrics_by_size(
          db_m, database.labels, {"q": (q_m, queries.labels)}, [m], knn_ks=knn_ks,
          retrieval_ks=retrieval_ks, search=search, num_classes=num_classes)["q"][m]
      if kind == "svd":  # the rank-m classifier itself
        _, head_m = baselines_lib.svd_head(kernel, m)
        logits = q_m.astype(np.float64) @ head_m + bias
        metrics["linear_top1"] = float(np.mean(np.argmax(logits, -1) == queries.labels))
      else:
        lp = probe.LinearProbe(num_classes, l2=probe_l2, steps=probe_steps).fit(
            db_m, database.labels)
        metrics["linear_top1"] = lp.accuracy(q_m, queries.labels)
      out[kind][str(m)] = metrics
  return out
