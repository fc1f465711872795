"""The PNG bar chart: time and memory per provider, grouped by shape."""

from pathlib import Path

#: (field, axis title, scale): each panel is drawn only when some record has a value for it, so a CPU run,
#: where peak memory is unavailable, shows no empty panel.
_PANELS = (
    ("median_ms", "median time per call (ms), whiskers p20..p80", 1.0),
    ("peak_bytes", "peak memory during a call (MiB)", 1 / 2**20),
    ("saved_bytes", "saved for backward (MiB)", 1 / 2**20),
    ("saved_beyond_x_bytes", "saved for backward, beyond x (MiB)", 1 / 2**20),
)


def _value(record, field) -> float:
    value = None if record is None else getattr(record, field)
    return 0.0 if value is None else value


def write_plot(path, records, *, title) -> None:
    """Write a bar chart of the timed records to `path` (PNG). Needs matplotlib, imported here so the
    benchmark runs without it when no plot is asked for."""
    import matplotlib

    matplotlib.use("Agg")  # no display is needed or assumed
    import matplotlib.pyplot as plt

    timed = [r for r in records if r.status == "ok"]
    if not timed:
        raise ValueError("no provider was timed, so there is nothing to plot")
    panels = [panel for panel in _PANELS if any(getattr(r, panel[0]) is not None for r in timed)]
    shapes = list(dict.fromkeys(f"{r.M}x{r.K}->{r.N}" for r in timed))
    labels = list(dict.fromkeys(r.label for r in timed))
    width = 0.8 / len(labels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.8 * len(shapes) + 3), 3.2 * len(panels)),
                                squeeze=False)
    for axis, (field, axis_title, scale) in zip(axes[:, 0], panels):
        for i, label in enumerate(labels):
            rows = {f"{r.M}x{r.K}->{r.N}": r for r in timed if r.label == label}
            heights = [_value(rows.get(s), field) * scale for s in shapes]
            positions = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(shapes))]
            # Time bars carry their p20..p80 spread, so a noisy (shared, CPU) measurement looks noisy.
            spread = None
            if field == "median_ms":
                spread = [[h - _value(rows.get(s), "p20_ms") for h, s in zip(heights, shapes)],
                          [_value(rows.get(s), "p80_ms") - h for h, s in zip(heights, shapes)]]
            axis.bar(positions, heights, width=width, label=label, yerr=spread, capsize=2,
                     error_kw={"elinewidth": 0.8})
        axis.set_xticks(range(len(shapes)))
        axis.set_xticklabels(shapes)
        axis.set_title(axis_title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8, frameon=False)
    untimed = [f"{r.label} ({r.status})" for r in records if r.status != "ok"]
    # Say which providers are missing from the bars, so an absent bar is never read as a zero.
    subtitle = f"\nnot timed: {'; '.join(dict.fromkeys(untimed))}" if untimed else ""
    figure.suptitle(title + subtitle, fontsize=9)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
