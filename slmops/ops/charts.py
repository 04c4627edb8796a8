"""One PNG per training run, for a README or a CI artefact: the loss curve, and beside it the table that says what
the run bought (matplotlib, from the ``bench`` extra, imported only when a chart is asked for)."""

from __future__ import annotations

from pathlib import Path

from slmops.types.errors import InvalidInput


def require(option: str = "--plot") -> None:
    """Fail before a long run, not after it, when the chart it ends with cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInput(f"{option} needs matplotlib; pip install 'slmops[bench]'") from None


def training_chart(path: Path, losses: list[float], title: str, ylabel: str, header: list[str],
                   cells: list[list[str]], widths: list[float]) -> None:
    """``cells`` under ``header`` (column ``widths`` in parts of the axis) beside the curve; no table when empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if cells else 1, figsize=(11 if cells else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(1, len(losses) + 1), losses, color="#3366aa")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if cells:
        ax = axes[0][1]
        ax.axis("off")
        table = ax.table(cellText=cells, colLabels=header, colWidths=widths, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
