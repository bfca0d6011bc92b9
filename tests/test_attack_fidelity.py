"""Fidelity to the original algorithms where robustlib claims their names.

Each test computes a number from the original algorithm's definition (Square's
p schedule and its L2 proposal, C&W's targeted margin) independently of the
implementation, or checks a contract the original keeps (targeted or not, known
at trace time; the epsilon-ball in float16 and bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
from attacks import core
from robustlib.checks import InputError

square_lib = attacks.square  # the module (called, the factory)

# ----------------------------------------------------------------------------
# Square's schedule of p.


def _published_p(iteration, queries, p_init, rescale):
  """The paper's piecewise schedule, written out: p_init / 2^k on (t_k, t_{k+1}]."""
  it = int(iteration / queries * 10000) if rescale else iteration
  edges = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
  halvings = sum(1 for e in edges if it > e)
  return p_init / 2**halvings


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("queries", [5000, 1000, 10000])
def test_square_p_schedule_is_the_published_one(rescale, queries):
  its = sorted({
      0, 5, 10, 11, 50, 51, 100, 101, 200, 201, 500, 501, 1000, 1001, 2000, 2001, 4000, 4001, 6001,
      8001, queries - 1
  })
  ours = [float(square_lib.p_selection(i, queries, 0.8, rescale)) for i in its if i < queries]
  theirs = [_published_p(i, queries, 0.8, rescale) for i in its if i < queries]
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_without_rescaling_p_halves_later_at_5000_queries():
  # AutoAttack's Square (resc_schedule=False): iteration 1001 of 5000 is at p_init / 32, not
  # p_init / 64 as the rescaled schedule has it (1001 * 2 = 2002 > 2000).
  assert float(square_lib.p_selection(1001, 5000, 0.8, False)) == pytest.approx(0.8 / 32)
  assert float(square_lib.p_selection(1001, 5000, 0.8, True)) == pytest.approx(0.8 / 64)


def _linear_model(k=5, d=(6, 6, 2), seed=0):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(int(np.prod(d)), k)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(6,) + d), jnp.float32)

  def logits_fn(v):
    return v.reshape(v.shape[0], -1) @ w

  return logits_fn, x, jnp.argmax(logits_fn(x), axis=1)


def test_autoattacks_square_stage_does_not_rescale_its_schedule():
  logits_fn, x, y = _linear_model()
  stage = attacks.autoattack(eps=0.02, queries=300).stages[-1]
  key = jax.random.PRNGKey(3)
  ours = stage(logits_fn, x, y, key)
  plain = attacks.square(0.02, queries=300, rescale_schedule=False)(logits_fn, x, y, key)
  rescaled = attacks.square(0.02, queries=300)(logits_fn, x, y, key)
  np.testing.assert_array_equal(ours, plain)
  assert not np.array_equal(ours, rescaled)


# ----------------------------------------------------------------------------
# Square's L2 proposal, against the original's update written out per channel.


def _rectangles_pattern(a, b):
  """Nested centred rectangles of an ``a x b`` block: ring k adds 1 / (k + 1)^2, unit norm."""
  out = np.zeros((a, b))
  ca, cb = a // 2 + 1, b // 2 + 1
  r0, c0 = ca - 1, cb - 1
  for k in range(max(ca, cb)):
    out[max(r0, 0):min(r0 + 2 * k + 1, a), max(c0, 0):min(c0 + 2 * k + 1, b)] += 1.0 / (k + 1)**2
    r0 -= 1
    c0 -= 1
  return out / np.sqrt((out**2).sum())


def _eta(s):
  top = _rectangles_pattern(s // 2, s)
  bottom = -_rectangles_pattern(s - s // 2, s)
  out = np.concatenate([top, bottom], axis=0)
  return out / np.sqrt((out**2).sum())


def test_square_l2_proposal_is_the_originals_update():
  rng = np.random.default_rng(4)
  n, h, w, c = 3, 9, 9, 3
  x = rng.uniform(0.3, 0.7, size=(n, h, w, c)).astype(np.float32)
  delta = rng.normal(size=(n, h, w, c)).astype(np.float32)
  delta *= 0.8 / np.sqrt((delta**2).sum(axis=(1, 2, 3), keepdims=True))  # inside the ball
  x_best = x + delta
  eps, p = 1.0, 0.3
  key = jax.random.PRNGKey(5)
  ours = np.asarray(
      square_lib._propose_l2(key, jnp.asarray(x), jnp.asarray(x_best), jnp.full((n,), eps),
                             p, (0.0, 1.0),
                             jnp.asarray(square_lib._inverse_square_sums(max(h, w) + 1))))
  # The same draws: window corners, the transpose flag and the channels' signs.
  u = np.asarray(square_lib._uniform(key, (n, 5 + c)))
  s = max(int(round(np.sqrt(p * h * w))), 3)
  s += 1 if s % 2 == 0 else 0
  for i in range(n):
    top, left = int(u[i, 0] * (h - s + 1)), int(u[i, 1] * (w - s + 1))
    top2, left2 = int(u[i, 2] * (h - s + 1)), int(u[i, 3] * (w - s + 1))
    pattern = _eta(s).T if u[i, 4] < 0.5 else _eta(s)
    signs = np.where(u[i, 5:] < 0.5, -1.0, 1.0)
    d = (x_best[i] - x[i]).astype(np.float64)
    w1 = (slice(top, top + s), slice(left, left + s))
    w2 = (slice(top2, top2 + s), slice(left2, left2 + s))
    both = np.zeros((h, w), bool)
    both[w1] = both[w2] = True
    norm_image = np.sqrt((d**2).sum())
    norm_windows = np.sqrt((d[both]**2).sum())
    new = np.empty((s, s, c))
    for ch in range(c):  # the original keeps window norms per channel
      old = d[w1 + (ch,)]
      v = pattern * signs[ch] + old / (1e-12 + np.sqrt((old**2).sum()))
      v /= 1e-12 + np.sqrt((v**2).sum())
      new[..., ch] = v * np.sqrt(max(eps**2 - norm_image**2, 0.0) / c + norm_windows**2)
    d[w2] = 0.0
    d[w1] = new
    theirs = np.clip(x[i] + d / np.sqrt((d**2).sum()) * eps, 0.0, 1.0)
    np.testing.assert_allclose(ours[i], theirs, atol=2e-5)


# ----------------------------------------------------------------------------
# The targeted margin.


def test_the_targeted_margin_is_positive_exactly_where_the_target_wins():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(500, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 6, size=500))
  t = (y + jnp.asarray(rng.integers(1, 6, size=500))) % 6
  margin = np.asarray(core.margin_loss(logits, y, t))
  np.testing.assert_array_equal(margin > 0, np.asarray(core.is_adversarial(logits, y, t)))
  # A case the logit difference z_t - z_y gets wrong: class 1 wins, not the target 2.
  z = jnp.asarray([[1.0, 3.0, 2.0]])
  assert float(core.margin_loss(z, jnp.asarray([0]), jnp.asarray([2]))[0]) == pytest.approx(-1.0)
  assert float(core.logit_difference(z, jnp.asarray([0]),
                                     jnp.asarray([2]))[0]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "make",
    [
        # Windows one input wide: a window over most inputs would jump into the region by chance.
        lambda: attacks.square(0.3, queries=300, p_init=0.05, targeted=True),
        lambda: attacks.spsa(0.3, targeted=True),
    ])
def test_targeted_black_box_attacks_reach_the_target(make):
  # With m the mean of 16 inputs at 0.9 (eps 0.3), z = (0, 3 m - 1, 2 m - 0.3): the target 2
  # wins for m in [0.6, 0.7) only. The logit difference z_2 - z_0 = 2 m - 0.3 leads up, away
  # from it; the C&W margin z_2 - z_1 = 0.7 - m leads down, into it.
  def logits_fn(v):
    m = jnp.mean(v, axis=1, keepdims=True)
    return jnp.concatenate([jnp.zeros_like(m), 3 * m - 1.0, 2 * m - 0.3], axis=1)

  x = jnp.full((8, 16), 0.9, jnp.float32)
  y = jnp.zeros((8,), jnp.int32)
  x_adv = make()(logits_fn, x, y, jax.random.PRNGKey(0), target=jnp.full((8,), 2))
  assert np.all(np.argmax(logits_fn(x_adv), axis=1) == 2)


# ----------------------------------------------------------------------------
# Static facts are checked at trace time too.


def test_targeted_or_not_is_checked_inside_jit():
  logits_fn, x, y = _linear_model()
  x = x.reshape(x.shape[0], -1)
  key = jax.random.PRNGKey(0)
  targeted = attacks.pgd(0.1, steps=3, targeted=True)
  with pytest.raises(InputError, match="targeted: pass target="):
    jax.jit(lambda v, l: targeted(logits_fn, v, l, key))(x, y)
  untargeted = attacks.pgd(0.1, steps=3)
  with pytest.raises(InputError, match="untargeted attack"):
    jax.jit(lambda v, l: untargeted(logits_fn, v, l, key, target=(l + 1) % 5))(x, y)
  with pytest.raises(InputError, match="untargeted attack"):
    jax.vmap(lambda v, l: untargeted(logits_fn, v[None], l[None], key, target=l[None]))(x, y)


# ----------------------------------------------------------------------------
# Narrow dtypes.

_ATTACKS = {
    "fgsm": lambda norm, eps: attacks.fgsm(eps, norm=norm),
    "pgd": lambda norm, eps: attacks.pgd(eps, norm=norm, steps=5),
    "apgd": lambda norm, eps: attacks.apgd(eps, norm=norm, steps=5),
    "multitargeted": lambda norm, eps: attacks.multitargeted(eps, norm=norm, steps=3),
    "fab": lambda norm, eps: attacks.fab(eps, norm=norm, steps=3),
    "square": lambda norm, eps: attacks.square(eps, norm=norm, queries=30),
    "spsa": lambda norm, eps: attacks.spsa(eps, steps=3),
}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.5)])
@pytest.mark.parametrize("name", sorted(_ATTACKS))
def test_narrow_dtypes_stay_in_the_ball_and_keep_their_dtype(name, norm, eps, dtype):
  if name == "spsa" and norm == "l2":
    pytest.skip("SPSA is an L-inf attack")
  logits_fn, x, y = _linear_model()
  x = x.reshape(x.shape[0], -1).astype(dtype)
  x_adv = _ATTACKS[name](norm, eps)(lambda v: logits_fn(v.astype(jnp.float32)), x, y,
                                    jax.random.PRNGKey(1))
  assert x_adv.dtype == dtype
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  dist = np.abs(d).max(axis=1) if norm == "linf" else np.sqrt((d**2).sum(axis=1))
  assert dist.max() <= eps, f"{dist.max()!r} > {eps} in {jnp.dtype(dtype).name}"
  assert np.all(np.asarray(x_adv, np.float64) >= 0) and np.all(np.asarray(x_adv, np.float64) <= 1)


def test_round_toward_never_moves_away_from_x():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.uniform(0, 1, 4000), jnp.float16)
  v = x.astype(jnp.float32) + jnp.asarray(rng.normal(0, 0.01, 4000), jnp.float32)
  r = core.round_toward(v, x)
  assert r.dtype == jnp.float16
  xs, vs, rs = (np.asarray(a, np.float64) for a in (x, v, r))
  assert np.all(np.abs(rs - xs) <= np.abs(vs - xs))
  assert np.all(np.abs(rs - vs) <= np.abs(np.spacing(rs.astype(np.float16)).astype(np.float64)))
