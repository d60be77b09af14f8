"""The PNG: per mode, the speed-up of fusedbn over each baseline and the efficiency η of every
provider, per case (shape, dtype, layout). Cases timed while other jobs used the CPU are marked
(† in the label, hatched bars) and do not set the speed-up axis: a bar beyond it is clipped and
its value written on it. matplotlib is optional: without it the plot is skipped."""
import sys

from .cases import MODES
from .report import (REFERENCE, baselines_of, by_case, contended, eta, eta_flagged,
                     providers_of, speedup)

# Speed-up ticks (log scale: 0.8 and 1.25 are as far from 1 either way).
SPEEDUP_TICKS = (0.5, 0.8, 1, 1.25, 1.5, 2, 3)
_MORE_TICKS = (4, 6, 8, 12, 16)
_SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _series(doc, mode):
    """Per case of the mode: its x label and whether it was contended; per series, the values
    (None where a provider did not run, or η was flagged)."""
    labels, marks, speed, effs, flagged = [], [], {}, {}, {}
    for (_, shape, dtype, layout, m), recs in by_case(doc["records"]).items():
        if m != mode:
            continue
        busy = any(contended(r) for r in recs.values())
        marks.append(busy)
        labels.append("%s%s\n%s %s" % ("x".join(map(str, shape)), "†" if busy else "",
                                       _SHORT_DTYPE.get(dtype, dtype), layout))
        for b in baselines_of(doc):
            speed.setdefault(b, []).append(speedup(recs, b))
        for p in providers_of(doc):
            effs.setdefault(p, []).append(eta(recs.get(p)))
            flagged.setdefault(p, []).append(eta_flagged(recs.get(p)))
    return labels, marks, speed, effs, flagged


def _speedup_limits(speed, marks):
    """(low, high, ticks) of the speed-up axis, from the cases that were not contended."""
    values = [v for vs in speed.values() for v, busy in zip(vs, marks) if v and not busy]
    values = values or [v for vs in speed.values() for v in vs if v] or [1.0]
    low = min(0.45, min(values) / 1.1)
    high = max(3.3, max(values) * 1.1)
    ticks = [t for t in SPEEDUP_TICKS if t >= low] + [t for t in _MORE_TICKS if t <= high]
    if low < 0.45:
        ticks = [t for t in (0.25, 0.35) if t >= low] + ticks
    return low, high, ticks


def _bars(ax, n_cases, series, colors, marks, clip=None, base=0.0):
    """Grouped bars from `base`, one group per case, one bar per series (colored by provider);
    contended cases hatched and lighter. Bars beyond clip=(low, high) are cut there and
    labelled with their value."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        for j, v in enumerate(values):
            if v is None:
                continue
            x = j + (i - (n - 1) / 2) * width
            shown = v
            if clip is not None:
                shown = min(max(v, clip[0]), clip[1])
            ax.bar(x, shown - base, width, bottom=base, color=colors[name],
                   alpha=0.45 if marks[j] else 1.0, hatch="//" if marks[j] else None,
                   edgecolor="white" if marks[j] else None, linewidth=0)
            if shown != v:
                ax.text(x, shown, "%.1f" % v, ha="center", va="top" if v > base else "bottom",
                        fontsize=7, rotation=90, color="black")
    ax.set_xlim(-0.6, n_cases - 0.4)
    ax.grid(axis="y", alpha=0.3)


def _x_labels(ax, labels):
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8, rotation=40, ha="right", rotation_mode="anchor")


def plot(doc, path):
    """Writes the PNG; returns False (after a note on stderr) when matplotlib is missing."""
    plt = _import_pyplot()
    if plt is None:
        print("note: matplotlib is not installed; skipping the plot %s "
              "(pip install matplotlib to get it)" % path, file=sys.stderr)
        return False
    from matplotlib.patches import Patch

    modes = [m for m in MODES if m in doc["config"]["modes"]]
    providers = providers_of(doc)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {p: cycle[i % len(cycle)] for i, p in enumerate(providers)}
    n_cases = max(len(_series(doc, m)[0]) for m in modes) if modes else 1
    width = min(max(8.0, 0.55 * n_cases + 3.0), 24.0)
    fig, axes = plt.subplots(len(modes), 2, figsize=(2 * width, 3.6 * len(modes) + 1.2),
                             squeeze=False)
    any_busy = any_flagged = False
    for row, mode in zip(axes, modes):
        labels, marks, speed, effs, flagged = _series(doc, mode)
        any_busy |= any(marks)
        any_flagged |= any(f for fs in flagged.values() for f in fs)
        low, high, ticks = _speedup_limits(speed, marks)
        ax = row[0]
        ax.set_yscale("log")
        _bars(ax, len(labels), speed, colors, marks, clip=(low, high), base=1.0)
        ax.set_ylim(low, high)
        ax.set_yticks(ticks)
        ax.set_yticklabels(["%g" % t for t in ticks], fontsize=9)
        ax.minorticks_off()
        ax.axhline(1.0, color="black", linewidth=0.9)
        ax.set_ylabel("speed-up of fusedbn (×)", fontsize=10)
        ax.set_title("%s: speed-up of fusedbn over each baseline, t(baseline) / t(fusedbn) "
                     "(up: fusedbn faster)" % mode, fontsize=11)
        _x_labels(ax, labels)
        ax = row[1]
        _bars(ax, len(labels), effs, colors, marks)
        for i, p in enumerate(providers):  # η above 1 is not a value: mark where it was
            n = max(len(providers), 1)
            for j, f in enumerate(flagged[p]):
                if f:
                    ax.text(j + (i - (n - 1) / 2) * 0.8 / n, 0.02, "‡", ha="center",
                            fontsize=9)
        ax.set_ylim(0, 1.0)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.tick_params(axis="y", labelsize=9)
        ax.set_ylabel("η (1 = copy bandwidth)", fontsize=10)
        ax.set_title("%s: η = minimal bytes / (time × copy bandwidth)" % mode, fontsize=11)
        _x_labels(ax, labels)
    handles = [Patch(color=colors[p], label=p if p != REFERENCE else "%s (η only)" % p)
               for p in providers]
    if any_busy:
        handles.append(Patch(facecolor="lightgray", hatch="//", edgecolor="white",
                             label="† timed while other processes used the CPU"))
    if any_flagged:
        handles.append(Patch(color="none", label="‡ η above 1: not reported"))
    env = doc["env"]
    fig.suptitle("fusedbn on %s (%s), torch %s" % (env["device_slug"], env["device_name"],
                                                  env["torch_version"]), fontsize=13)
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), fontsize=10,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()))
    top = 1 - 0.9 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
