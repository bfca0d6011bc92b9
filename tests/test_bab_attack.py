"""The branch-and-bound attack: its counterexamples are real, it never beats a proof, and its
search of subdomains finds points a weak descent misses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bound_testing
from robustlib.checks import InputError
from verify.bab_attack import bab_attack
from verify.milp import milp_verify
from verify.unsafe import UnsafeSet


@pytest.fixture(scope="module")
def net():
  fn, _ = bound_testing.relu_mlp(1, (8, 24, 24, 4))
  points = np.random.default_rng(0).uniform(size=(8, 8)).astype(np.float32)
  return fn, points


def _label(fn, x):
  return int(np.argmax(fn(jnp.asarray(x)[None])))


def test_subdomains_break_what_a_weak_descent_misses_and_never_a_proven_point(net):
  fn, points = net
  outcomes = []
  for i in (1, 5):
    x = points[i]
    y = _label(fn, x)
    exact = milp_verify(fn, np.clip(x - 0.25, 0, 1), np.clip(x + 0.25, 0, 1),
                        UnsafeSet.misclassified(y, 4)).status
    r = bab_attack(fn,
                   x,
                   y,
                   0.25,
                   jax.random.key(i),
                   time_limit=30,
                   restarts=4,
                   pgd_steps=5,
                   free=(4, 8, 16, 64))
    outcomes.append((r.status, r.stage, exact))
    if r.status == "broken":
      assert exact == "falsified"
      assert np.max(np.abs(r.x_adv - x)) <= 0.25 + 1e-6 and np.all((0 <= r.x_adv) & (r.x_adv <= 1))
      assert _label(fn, r.x_adv) != y
    if exact == "verified":
      assert r.status != "broken"
  # Found inside a subdomain (by descent there or a program), not by the descent over the ball.
  assert any(status == "broken" and stage in ("subdomain descent", "dive")
             for status, stage, _ in outcomes), outcomes
  assert any(exact == "verified" and status == "verified" for status, _, exact in outcomes)


def test_bab_attack_refuses_bad_settings(net):
  fn, points = net
  x, key = points[0], jax.random.key(0)
  for kwargs, match in [(dict(eps=0.0), "eps"), (dict(eps=0.1, time_limit=0), "time_limit"),
                        (dict(eps=0.1, restarts=0), "restarts"), (dict(eps=0.1, free=()), "free"),
                        (dict(eps=0.1, beam_size=0), "beam_size"), (dict(eps=0.1, y=7), "label 7")]:
    args = {"y": _label(fn, x), **kwargs}
    with pytest.raises(InputError, match=match):
      bab_attack(fn, x, args.pop("y"), args.pop("eps"), key, **args)


def test_counterexamples_lie_in_the_ball_itself_not_its_float32_rounding():
  # x + eps (real) lies strictly between two float32 numbers a < b, nearer to b: the ball
  # rounded to nearest ends at b, which this network misclassifies; no point of the ball does.
  x = np.float32(0.3)
  eps = next(e for e in 0.1 + 1e-9 * np.arange(1, 100)
             if np.float64(np.float32(np.float64(x) + e)) > np.float64(x) + e)
  a = np.nextafter(np.float32(np.float64(x) + eps), np.float32(0))
  fn = lambda z: jnp.concatenate([jnp.zeros_like(z), jax.nn.relu(z - a)], axis=1)
  r = bab_attack(fn,
                 np.asarray([x]),
                 0,
                 eps,
                 jax.random.key(0),
                 time_limit=5,
                 restarts=4,
                 pgd_steps=10)
  assert r.status == "unknown", r  # not broken at b, and not verified (b is in the rounded box)
