"""Plots of loss landscapes (matplotlib, Agg backend, imported only here and only when a plot is drawn)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .landscape import Landscape

__all__ = ["plot_landscapes"]

_AXIS = {
    "interpolation": "α  (0 = first checkpoint, 1 = second)",
    "random_1d": "α  (filter-normalised random direction)",
}


def plot_landscapes(
    landscapes: Sequence[Landscape],
    out: str | os.PathLike,
    *,
    title: str | None = None,
    subtitle: str | None = None,
    relative: bool = False,
    dpi: int = 110,
) -> str:
    """Draw landscapes into a PNG: curves on one set of axes (1-D), or one contour panel per model (2-D).

    Args:
        landscapes (`Sequence[Landscape]`): All 1-D (`"interpolation"` / `"random_1d"`) or all `"random_2d"`;
            their `label`s name the curves or panels.
        out (`str | os.PathLike`): The PNG path.
        title (`str`, *optional*): Figure title (a default describes the kind of landscape).
        subtitle (`str`, *optional*): A smaller second line (e.g. the data and the seed).
        relative (`bool`, defaults to `False`): Plot L - L(w), the rise above each model's own loss (at the
            origin; for an interpolation, at the first checkpoint), so that models with different losses compare
            by shape. 2-D panels then share levels of the rise.
        dpi (`int`, defaults to `110`): Resolution.

    Returns:
        `str`: the path written.
    """
    if not landscapes:
        raise ValueError("`landscapes` is empty: nothing to plot.")
    kinds = {ls.kind for ls in landscapes}
    if len(kinds) > 1 and "random_2d" in kinds:
        raise ValueError(f"`landscapes` mixes 1-D and 2-D kinds ({sorted(kinds)}); plot them separately.")
    # A bare `Figure` renders with Agg and leaves pyplot's global backend alone (notebooks keep theirs).
    from matplotlib.figure import Figure

    labels = [ls.label or f"model {i + 1}" for i, ls in enumerate(landscapes)]
    if relative:
        landscapes = [_relative(ls) for ls in landscapes]
    if "random_2d" in kinds:
        fig = _plot_2d(Figure, landscapes, labels, relative)
        default = "Loss surface along two filter-normalised random directions"
    else:
        fig = _plot_1d(Figure, landscapes, labels, relative)
        default = (
            "Loss along the line between checkpoints"
            if kinds == {"interpolation"}
            else "Loss along a filter-normalised random direction"
        )
    heading = title or default
    if subtitle:
        heading = f"{heading}\n{subtitle}"
    fig.suptitle(heading, fontsize=11)
    out = os.fspath(out)
    fig.savefig(out, dpi=dpi)
    return out


def _relative(ls: Landscape) -> Landscape:
    if ls.kind == "interpolation":
        i = int((ls.x - 0.0).abs().argmin())
        origin = ls.losses[i]
    elif ls.kind == "random_1d":
        origin = ls.losses[int(ls.x.abs().argmin())]
    else:
        origin = ls.losses[int(ls.x.abs().argmin()), int(ls.y.abs().argmin())]
    return Landscape(ls.kind, ls.x, ls.y, ls.losses - origin, ls.label)


def _plot_1d(figure: type, landscapes: Sequence[Landscape], labels: list[str], relative: bool) -> Any:
    fig = figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.subplots()
    for ls, label in zip(landscapes, labels):
        ax.plot(ls.x.numpy(), ls.losses.numpy(), marker="o", markersize=3, linewidth=1.8, label=label)
    kinds = {ls.kind for ls in landscapes}
    ax.set_xlabel(_AXIS["interpolation"] if kinds == {"interpolation"} else _AXIS["random_1d"])
    ax.set_ylabel("loss − loss at the weights" if relative else "loss")
    marks = [0.0, 1.0] if kinds == {"interpolation"} else [0.0]
    for i, mark in enumerate(marks):
        name = "checkpoints" if kinds == {"interpolation"} else "trained weights"
        ax.axvline(mark, color="0.5", linewidth=0.9, linestyle="--", label=name if i == 0 else None)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def _plot_2d(figure: type, landscapes: Sequence[Landscape], labels: list[str], relative: bool) -> Any:
    import numpy as np
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    n = len(landscapes)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = figure(figsize=(4.6 * cols + 0.8, 4.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    low = min(float(ls.losses.min()) for ls in landscapes)
    high = max(float(ls.losses.max()) for ls in landscapes)
    if not high > low:
        high = low + 1e-6
    # Shared levels (the same colour is the same loss in every panel), denser near the lowest loss, where the
    # basins differ; the rims of a landscape are steep and would otherwise take all the levels.
    levels = low + (high - low) * (np.geomspace(1.0, 101.0, 22) - 1.0) / 100.0
    filled = None
    for ax, ls, label in zip(axes.flat, landscapes, labels):
        x, y, z = ls.x.numpy(), ls.y.numpy(), ls.losses.numpy().T  # contour wants z[row = y, col = x]
        filled = ax.contourf(x, y, z, levels=levels, cmap="viridis")
        lines = ax.contour(x, y, z, levels=levels[1::3], colors="white", linewidths=0.6)
        ax.clabel(lines, fontsize=7, fmt="%.3g")
        (star,) = ax.plot([0.0], [0.0], marker="*", markersize=12, color="red", linestyle="none")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("α  (direction 1)")
        ax.set_ylabel("β  (direction 2)")
        ax.set_aspect("equal")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    colorbar = fig.colorbar(
        filled, ax=axes.ravel().tolist(), label="loss − loss at w" if relative else "loss", shrink=0.9
    )
    colorbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    fig.legend([star], ["trained weights w (α = β = 0)"], loc="outside lower center", fontsize=9, frameon=False)
    return fig
