"""The Matryoshka contrastive loss in row tiles, with its gradient written out (jax.custom_vjp).

Under autodiff, contrastive.matryoshka_contrastive_loss keeps every size's B x B logit matrix for
the backward pass: |M| B x B matrices written and read back, memory-bound passes that on CPU cost
~145 ms per extra size at B = 4096 (benchmarks/contrastive_loss.py). Here the rows are taken T at
a time (lax.scan): for one tile the block partial dot products between consecutive sizes are
accumulated into one T x B matrix, each size's logits, loss and gradient are formed from it while
it is in cache, and no B x B array is ever stored. With D_k = sum_{blocks j <= k} a_j b_j^T,
ia_k, ib_k the inverse norms of the m_k-prefixes, cos_k = D_k ia_k ib_k^T, L_k = s_k cos_k + c_k
and G_k = dloss / dL_k:

  ds_k = sum G_k cos_k,  dc_k = sum G_k,  dia_k = s_k rowsum(G_k cos_k) / ia_k  (dib_k: colsum)
  H_k = s_k G_k ia_k ib_k^T,  da_j = (sum_{k >= j} H_k) b_j,  db_j = (sum_{k >= j} H_k)^T a_j

Each loss splits into a part that is linear in the logits (the targets: the diagonal and, with
label smoothing, the mean logit), whose value and gradient cost O(B d) and are left to autodiff,
and a reduction over every logit that the tiles compute:
- "rows": sum_i logsumexp_j L_ij (one-directional InfoNCE), G = softmax over the row;
- "both": (sum_i lse_row_i + sum_j lse_col_j) / 2 (CLIP / ALIGN), G = (row + column softmax) / 2;
- "softplus": sum_ij softplus(L_ij) (SigLIP: -log sigmoid(-L) = softplus(L), and the diagonal's
  -log sigmoid(L) = softplus(L) - L), G = sigmoid(L).
For "rows" and "softplus" each tile has what its gradient needs, so the forward pass computes the
gradient for the given size weights and the loss costs 3 B x B x d matmuls, as one size under
autodiff. "both" needs each column's log-sum-exp over all rows: the forward pass accumulates it
over the tiles (rescaled as the running maximum grows, as flash attention does) and the backward
pass recomputes the tiles: 4 matmuls.
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp

def tile_size(batch: int, tile_rows: int) -> int:
  """The largest divisor of `batch` that is at most `tile_rows` (the scan needs equal tiles)."""
  return max(t for t in range(1, min(batch, tile_rows) + 1) if batch % t == 0)


def _blocks(sizes):
  return list(zip([0] + list(sizes[:-1]), sizes))


def _sweep(a, b, ia, ib, s, c, w, *, sizes, reduction, tile, stats, grads, lse=None):
  """One pass over the row tiles.

  stats: the reduction's values [S], the top-1 hits [S, B] and, for the softmax, the row (and
  column) log-sum-exps [S, B]; grads: the gradient of sum_k w_k value_k with respect to
  (a, b, ia, ib, s, c), given `lse` = (row, column) when the pass does not compute them."""
  blocks = _blocks(sizes)
  n_sizes, (batch, dim), n_tiles = len(sizes), a.shape, a.shape[0] // tile
  per_tile = lambda x: x.reshape(n_sizes, n_tiles, tile).transpose(1, 0, 2)  # [S, B] -> tiles
  untile = lambda x: x.transpose(1, 0, 2).reshape(n_sizes, batch)
  # Blocks sliced (and transposed) once, so that every product in the loop is in the layout
  # XLA:CPU multiplies fastest: a transposed skinny operand inside the loop costs it 5-10x.
  b_blocks = [b[:, start:m] for start, m in blocks]
  bt_blocks = [x.T for x in b_blocks]
  a_blocks = [a[:, start:m].reshape(n_tiles, tile, m - start) for start, m in blocks]
  tiles = (jnp.arange(n_tiles) * tile, a_blocks, [x.transpose(0, 2, 1) for x in a_blocks],
           per_tile(ia), None if lse is None else per_tile(lse[0]))
  online_cols = stats and reduction == "both"

  def body(carry, x):
    offset, a_r, at_r, ia_r, lse_r = x
    values, col_max, col_sum, db, dib, ds, dc = carry
    new = {key: [] for key in ("values", "col_max", "col_sum", "dib", "ds", "dc", "hits",
                               "lse", "dia", "h")}
    d = jnp.zeros((tile, batch), jnp.float32)
    for k in range(n_sizes):
      d = d + a_r[k] @ bt_blocks[k]
      cos = d * ia_r[k][:, None] * ib[k][None, :]
      logits = s[k] * cos + c[k]
      g = None
      if stats:
        top = jnp.max(logits, axis=1)
        positive = jnp.take_along_axis(logits, (offset + jnp.arange(tile))[:, None], axis=1)
        new["hits"].append((positive[:, 0] >= top).astype(jnp.float32))
        if reduction == "softplus":  # one exp for softplus and sigmoid (jax.nn takes two)
          e = jnp.exp(-jnp.abs(logits))
          new["values"].append(values[k] + jnp.sum(jnp.maximum(logits, 0.0) + jnp.log1p(e)))
          if grads:
            g = w[k] * jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
        else:
          e = jnp.exp(logits - top[:, None])
          total = jnp.sum(e, axis=1)
          new["lse"].append(top + jnp.log(total))
          half = 0.5 if reduction == "both" else 1.0
          new["values"].append(values[k] + half * jnp.sum(new["lse"][-1]))
          if grads and reduction == "rows":
            g = w[k] * e / total[:, None]
        if online_cols:
          grown = jnp.maximum(col_max[k], jnp.max(logits, axis=0))
          new["col_sum"].append(col_sum[k] * jnp.exp(col_max[k] - grown)
                                + jnp.sum(jnp.exp(logits - grown[None, :]), axis=0))
          new["col_max"].append(grown)
      if grads:
        if g is None:  # "both": the second pass, every row's and column's lse known
          g = 0.5 * w[k] * (jnp.exp(logits - lse_r[k][:, None])
                            + jnp.exp(logits - lse[1][k][None, :]))
        q = g * cos
        new["ds"].append(ds[k] + jnp.sum(q))
        new["dc"].append(dc[k] + jnp.sum(g))
        new["dia"].append(s[k] * jnp.sum(q, axis=1) / ia_r[k])
        new["dib"].append(dib[k] + s[k] * jnp.sum(q, axis=0) / ib[k])
        new["h"].append(s[k] * g * ia_r[k][:, None] * ib[k][None, :])
    da_r = None
    if grads:  # dD_j accumulates every size k >= j: descending sums of the h's
      h, da_r, db = 0.0, [None] * n_sizes, list(db)
      for k in reversed(range(n_sizes)):
        h = h + new["h"][k]
        da_r[k] = h @ b_blocks[k]
        db[k] = db[k] + at_r[k] @ h  # kept transposed: [block, B]
      da_r = jnp.concatenate(da_r, axis=1)
    stack = lambda key, old: jnp.stack(new[key]) if new[key] else old
    carry = (stack("values", values), stack("col_max", col_max), stack("col_sum", col_sum),
             tuple(db), stack("dib", dib), stack("ds", ds), stack("dc", dc))
    return carry, (stack("hits", None), stack("lse", None), da_r, stack("dia", None))

  zeros, cols = jnp.zeros((n_sizes,), jnp.float32), jnp.zeros((n_sizes, batch), jnp.float32)
  db = tuple(jnp.zeros((m - start, batch), jnp.float32) for start, m in blocks) if grads else ()
  init = (zeros, jnp.full((n_sizes, batch), -jnp.inf, jnp.float32), cols, db, cols, zeros, zeros)
  carry, (hits, rows, da, dia) = jax.lax.scan(body, init, tiles)
  values, col_max, col_sum, db, dib, ds, dc = carry
  out = {}
  if stats:
    out.update(values=values, hits=untile(hits))
    if rows is not None:
      out["lse"] = (untile(rows), None)
    if online_cols:
      out["lse"] = (out["lse"][0], col_max + jnp.log(col_sum))
      out["values"] = values + 0.5 * jnp.sum(out["lse"][1], axis=1)
  if grads:
    out["grads"] = (da.reshape(batch, dim), jnp.concatenate(db, axis=0).T, untile(dia), dib,
                    ds, dc)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _reduce(a, b, ia, ib, s, c, w, sizes, reduction, tile):
  out = _sweep(a, b, ia, ib, s, c, w, sizes=sizes, reduction=reduction, tile=tile, stats=True,
               grads=False)
  return jnp.sum(w * out["values"]), out["values"], out["hits"]


def _reduce_fwd(a, b, ia, ib, s, c, w, sizes, reduction, tile):
  one_pass = reduction != "both"
  out = _sweep(a, b, ia, ib, s, c, w, sizes=sizes, reduction=reduction, tile=tile, stats=True,
               grads=one_pass)
  saved = out["grads"] if one_pass else (a, b, ia, ib, s, c, w, out["lse"])
  return (jnp.sum(w * out["values"]), out["values"], out["hits"]), (saved, out["values"])


def _reduce_bwd(sizes, reduction, tile, residuals, cotangents):
  """Only the weighted total carries a gradient: the wrapper stops the others'."""
  saved, values = residuals
  g = cotangents[0]
  if reduction == "both":  # the second pass, with every row's and column's lse known
    a, b, ia, ib, s, c, w, lse = saved
    saved = _sweep(a, b, ia, ib, s, c, w, sizes=sizes, reduction=reduction, tile=tile,
                   stats=False, grads=True, lse=lse)["grads"]
  da, db, dia, dib, ds, dc = (g * x for x in saved)
  return da, db, dia, dib, ds, dc, g * values


_reduce.defvjp(_reduce_fwd, _reduce_bwd)


def inverse_norms(x, sizes):
  """[S, B]: 1 / |x[:, :m]| per size (sizes ascending), from the blocks' squared norms. A zero
  prefix (norm <= 1e-12) gets 0: its cosines are 0 and it sends no gradient, where a norm
  clamped after the square root gave sqrt's infinite derivative at 0 times 0 = NaN."""
  squares, out, start = 0.0, [], 0
  for m in sizes:
    squares = squares + jnp.sum(x[:, start:m] ** 2, axis=-1)
    nonzero = squares > 1e-24
    out.append(jnp.where(nonzero, 1.0 / jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0))
    start = m
  return jnp.stack(out)


def matryoshka_contrastive_loss(a, b, sizes: Sequence[int], weights, scale, bias, *,
                                loss: str, symmetric: bool, label_smoothing: float,
                                tile_rows: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """contrastive.matryoshka_contrastive_loss (same values, gradients and metrics) in row tiles
  of at most `tile_rows` rows. `scale`, `bias`: [S] (bias None: zeros)."""
  sizes = tuple(sorted(sizes))
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  batch = a.shape[0]
  ia, ib = inverse_norms(a, sizes), inverse_norms(b, sizes)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (len(sizes),))
  bias = jnp.zeros_like(scale) if bias is None else jnp.broadcast_to(
      jnp.asarray(bias, jnp.float32), (len(sizes),))
  weights = jnp.asarray(weights, jnp.float32)
  reduction = "softplus" if loss == "sigmoid" else ("both" if symmetric else "rows")
  total, sums, hits = _reduce(a, b, ia, ib, scale, bias, weights / batch, sizes, reduction,
                              tile_size(batch, tile_rows))
  sums, hits = jax.lax.stop_gradient((sums, hits))
  # The part of each loss that is linear in the logits: the positives (and the mean logit).
  diagonal, grand, start, dots = [], [], 0, 0.0
  for k, m in enumerate(sizes):
    dots = dots + jnp.sum(a[:, start:m] * b[:, start:m], axis=-1)
    diagonal.append(jnp.mean(scale[k] * dots * ia[k] * ib[k]) + bias[k])
    grand.append(scale[k] * jnp.dot(ia[k] @ a[:, :m], ib[k] @ b[:, :m]) / batch**2 + bias[k])
    start = m
  diagonal, grand = jnp.stack(diagonal), jnp.stack(grand)
  if loss == "sigmoid":
    linear = -diagonal
  else:
    linear = -(1.0 - label_smoothing) * diagonal - label_smoothing * grand
  total = total + jnp.sum(weights * linear)
  per_size = sums / batch + jax.lax.stop_gradient(linear)
  metrics = {}
  for k, m in enumerate(sizes):
    metrics[f"loss@{m}"] = per_size[k]
    metrics[f"acc@{m}"] = jnp.mean(hits[k])
  return total, metrics
