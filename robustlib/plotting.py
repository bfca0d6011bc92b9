"""PNG plots of curves (training metrics, robust accuracy against epsilon)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def save_line_plots(path: str,
                    panels: Mapping[str, Series],
                    *,
                    xlabel: str = "step",
                    title: str | None = None) -> str:
  """Saves one row of line-plot panels to a PNG.

  Args:
    path: output file (``.png``); written atomically.
    panels: panel title -> {series label -> (xs, ys)}.
    xlabel: label of every x axis.
    title: optional figure title.

  Returns:
    ``path``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (panel, series) in zip(axes[0], panels.items()):
    for label, (xs, ys) in series.items():
      ax.plot(list(xs), list(ys), marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_title(panel)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
