"""The PNG: per mode, the speed-up of fusedbn over each baseline and the efficiency η of every
provider, per (shape, dtype, layout; † marks cases timed while other jobs used the CPU).
matplotlib is optional: without it the plot is skipped."""
import sys

from .cases import MODES
from .report import baselines_of, by_case, contended, providers_of, speedup


def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _series(doc, mode):
    """x labels and, per series name, the values (None where a provider did not run)."""
    labels, speed, eta = [], {}, {}
    for (_, shape, dtype, layout, m), recs in by_case(doc["records"]).items():
        if m != mode:
            continue
        mark = "†" if any(contended(r) for r in recs.values()) else ""
        labels.append("%s%s\n%s %s" % ("x".join(map(str, shape)), mark, dtype,
                                       "CL" if layout == "channels_last" else "NCHW"))
        for b in baselines_of(doc):
            speed.setdefault("vs " + b, []).append(speedup(recs, b))
        for p in providers_of(doc):
            rec = recs.get(p) or {}
            eta.setdefault(p, []).append(rec.get("eta"))
    return labels, speed, eta


def _bars(ax, labels, series, ylabel, colors):
    """Grouped bars, one group per x label, one bar per series (colored by provider)."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name,
               color=colors[name.replace("vs ", "")])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def plot(doc, path):
    """Writes the PNG; returns False (after a note on stderr) when matplotlib is missing."""
    plt = _import_pyplot()
    if plt is None:
        print("note: matplotlib is not installed; skipping the plot %s "
              "(pip install matplotlib to get it)" % path, file=sys.stderr)
        return False
    modes = [m for m in MODES if m in doc["config"]["modes"]]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {p: cycle[i % len(cycle)] for i, p in enumerate(providers_of(doc))}
    fig, axes = plt.subplots(len(modes), 2, figsize=(18, 4.2 * len(modes)), squeeze=False)
    for row, mode in zip(axes, modes):
        labels, speed, eta = _series(doc, mode)
        _bars(row[0], labels, speed, "speed-up of fusedbn (x)", colors)
        ticker = plt.matplotlib.ticker
        row[0].set_yscale("log", base=2)
        row[0].yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        row[0].yaxis.set_minor_formatter(ticker.NullFormatter())
        row[0].axhline(1.0, color="black", linewidth=0.8)
        row[0].set_title("%s: t(baseline) / t(fusedbn)" % mode)
        _bars(row[1], labels, eta, "eta", colors)
        row[1].set_ylim(0, max([1.0] + [v for vs in eta.values() for v in vs if v]) * 1.05)
        row[1].set_title("%s: eta = minimal bytes / (time x copy bandwidth)" % mode)
    env = doc["env"]
    fig.suptitle("fusedbn on %s (%s), torch %s" % (env["device_slug"], env["device_name"],
                                                  env["torch_version"]))
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
