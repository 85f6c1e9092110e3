"""Post-hoc linear probe: multinomial logistic regression on frozen features, in JAX.

Used by the baselines (PCA, random features, any representation without a trained head):
features are standardised with the training mean/std, then W, b minimise the mean softmax
cross-entropy + l2/2 * |W|^2 with optax L-BFGS (zoom line search), full batch: the problem is
convex, so this is the exact probe, not a stochastic approximation of it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, y, *, num_classes: int, l2: float, steps: int):
  d = x.shape[1]
  params = {"w": jnp.zeros((d, num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  targets = jax.nn.one_hot(y, num_classes)

  def loss(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy(logits, targets).mean() + 0.5 * l2 * jnp.sum(p["w"]**2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (params, _), values = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params, values


class LinearProbe:
  """fit(train features, labels) then predict / accuracy on other features."""

  def __init__(self, num_classes: int, *, l2: float = 1e-4, steps: int = 200):
    self.num_classes = num_classes
    self.l2 = l2
    self.steps = steps

  def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearProbe":
    x = np.asarray(x, np.float32)
    self.mean = x.mean(0)
    self.std = x.std(0) + 1e-6
    params, values = _fit(jnp.asarray((x - self.mean) / self.std), jnp.asarray(y),
                          num_classes=self.num_classes, l2=self.l2, steps=self.steps)
    self.params = jax.device_get(params)
    self.final_loss = float(values[-1])
    return self

  def logits(self, x: np.ndarray) -> np.ndarray:
    x = (np.asarray(x, np.float32) - self.mean) / self.std
    return x @ self.params["w"] + self.params["b"]

  def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(self.logits(x), -1) == y))
