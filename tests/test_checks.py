"""Input validation names the problem."""

import numpy as np
import pytest

from robustlib import checks


def test_accepts_valid_images_and_labels():
  checks.check_images(np.random.rand(3, 4, 4, 1).astype(np.float32), rank=4)
  checks.check_labels(np.array([0, 1, 2]), num_examples=3, num_classes=3)


@pytest.mark.parametrize("x, message", [
    (np.full((2, 3), np.nan, np.float32), "NaN"),
    (np.array([[0.5, np.inf]], np.float32), "infinite"),
    (np.array([[0.5, 1.5]], np.float32), r"must lie in \[0.0, 1.0\]"),
    (np.array([[-0.1, 0.5]], np.float32), "first offending example at index 0"),
    (np.zeros((2, 3), np.uint8), "floating dtype"),
])
def test_rejects_bad_images(x, message):
  with pytest.raises(checks.InputError, match=message):
    checks.check_images(x)


def test_nan_error_names_the_first_bad_example():
  x = np.zeros((5, 2), np.float32)
  x[3, 1] = np.nan
  with pytest.raises(checks.InputError, match="first at index 3"):
    checks.check_images(x)


def test_rank_is_checked():
  with pytest.raises(checks.InputError, match="rank 4"):
    checks.check_images(np.zeros((2, 8, 8), np.float32), rank=4)


@pytest.mark.parametrize("y, kwargs, message", [
    (np.zeros((2, 1), np.int32), {}, "vector"),
    (np.zeros(2, np.float32), {}, "integer"),
    (np.zeros(2, np.int32), {
        "num_examples": 3
    }, "2 labels but there are 3"),
    (np.array([0, 10]), {
        "num_classes": 10
    }, r"\[0, 10\)"),
])
def test_rejects_bad_labels(y, kwargs, message):
  with pytest.raises(checks.InputError, match=message):
    checks.check_labels(y, **kwargs)
