"""A service's ``history.jsonl`` rendered for a person: λ_max and λ_min against the step with
their certified intervals as error bars, the full-data work per step (warm vs cold starts), and a
short text summary."""
from __future__ import annotations

import os
import statistics

from .errors import InputError
from .history import HISTORY, read_history


def load_history(out_dir: str) -> list[dict]:
    """The entries of ``out_dir/history.jsonl``, in step order; an error naming the fix if none."""
    if not os.path.exists(os.path.join(out_dir, HISTORY)):
        raise InputError(f"no {HISTORY} in {out_dir!r}: pass the --out-dir a service wrote to "
                         "(`hessdist serve --out-dir ...`, default hessdist-out/NAME)")
    entries = read_history(out_dir)
    if not entries:
        raise InputError(f"{os.path.join(out_dir, HISTORY)} holds no solves yet: submit one first")
    return sorted(entries, key=lambda e: e["step"])


def _end(entries: list[dict], name: str) -> tuple[list[int], list[float], list[list[float]]]:
    """Steps, values and [below, above] error-bar lengths of the first pair of one end (an
    unbounded side of an interval is drawn as no bar on that side)."""
    steps, values, bars = [], [], [[], []]
    for e in entries:
        if not e.get(name):
            continue
        value, (lo, hi) = e[name][0], e["intervals"][name][0]
        steps.append(e["step"])
        values.append(value)
        bars[0].append(value - lo if lo is not None else 0.0)
        bars[1].append(hi - value if hi is not None else 0.0)
    return steps, values, bars


def _first_width(entry: dict, name: str) -> float:
    """The first pair's relative interval width (inf when a side is unbounded)."""
    width = entry["relative_widths"][name][0]
    return float("inf") if width is None else width


def summary(entries: list[dict]) -> str:
    """A few lines: the range of steps, each end first → last, the work, what did not converge."""
    fpe = [e["fpe"] for e in entries]
    warm = [e["fpe"] for e in entries if e.get("warm_start")]
    lines = [f"{len(entries)} solves, steps {entries[0]['step']} to {entries[-1]['step']}"]
    for name, label in (("largest", "λ_max"), ("smallest", "λ_min")):
        have = [e for e in entries if e.get(name)]
        if have:
            lines.append(f"{label}: {have[0][name][0]:.6g} (step {have[0]['step']}) → {have[-1][name][0]:.6g} "
                         f"(step {have[-1]['step']}); relative interval width at most "
                         f"{max(_first_width(e, name) for e in have):.2g}")
    lines.append(f"full-data product equivalents (FPE): {sum(fpe):.1f} in all, median {statistics.median(fpe):.1f} "
                 f"per solve" + (f", median {statistics.median(warm):.1f} when warm-started" if warm else ""))
    cold = [e for e in entries if e.get("cold_fpe") is not None]
    if cold:
        lines.append(f"warm vs cold (compare_cold, {len(cold)} solves): median FPE saved "
                     f"{statistics.median(e['cold_fpe'] - e['fpe'] for e in cold):.1f}")
    unconverged = [e["step"] for e in entries if not e.get("converged")]
    lines.append(f"not converged (stopped by a limit): steps {unconverged}" if unconverged
                 else "every solve met its accuracy")
    return "\n".join(lines)


def render(out_dir: str, path: str | None = None) -> tuple[str, str]:
    """Write the figure (default ``out_dir/report.png``) and ``report.txt`` next to it; returns
    (figure path, summary text)."""
    entries = load_history(out_dir)
    path = path or os.path.join(out_dir, "report.png")
    fig = figure(entries, f"hessdist: {os.path.basename(os.path.abspath(out_dir))}, {len(entries)} solves")
    import matplotlib.pyplot as plt               # after figure() chose the Agg backend
    fig.savefig(path, dpi=120)
    plt.close(fig)
    text = summary(entries)
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "report.txt"), "w") as fh:
        fh.write(text + "\n")
    return path, text


def figure(entries: list[dict], title: str):
    """The report's figure (three panels sharing the step axis, ticked at whole steps only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True, height_ratios=(2, 2, 1.4))
    for ax, name, label, colour in ((axes[0], "largest", "λ_max", "tab:red"),
                                    (axes[1], "smallest", "λ_min", "tab:blue")):
        steps, values, bars = _end(entries, name)
        ax.errorbar(steps, values, yerr=bars, fmt="o-", color=colour, capsize=4, ms=4,
                    label=f"{label} with its certified interval")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    steps = [e["step"] for e in entries]
    colours = ["tab:green" if e.get("warm_start") else "tab:gray" for e in entries]
    axes[2].bar(steps, [e["fpe"] for e in entries], color=colours, width=0.6)
    cold = [(e["step"], e["cold_fpe"]) for e in entries if e.get("cold_fpe") is not None]
    if cold:
        axes[2].plot(*zip(*cold), "kx", label="a cold start would have cost")
    handles = [Patch(color="tab:green", label="warm start"), Patch(color="tab:gray", label="cold start"),
               *axes[2].get_legend_handles_labels()[0]]
    axes[2].set_ylabel("FPE per solve")
    axes[2].set_xlabel("step (epoch)")
    axes[2].legend(handles=handles, loc="upper left", fontsize=9)
    axes[2].grid(alpha=0.3, axis="y")
    if len(steps) <= 20:
        axes[2].set_xticks(steps)                          # every step labelled
    else:
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig
