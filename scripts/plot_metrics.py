"""Plot a run's training reward and held-out accuracy over steps from its TensorBoard events.

    python scripts/plot_metrics.py --workdir=runs/default                 # writes runs/default/metrics.png
    python scripts/plot_metrics.py --workdir=runs/default --out=docs/default_run.png
    python scripts/plot_metrics.py --workdir=runs/a --label=A --workdir=runs/b --label=B --out=ab.png  # compared

A workdir whose run has a cold start holds the GRPO stage in WORKDIR/grpo; that one is plotted.

Needs matplotlib (in the `test` extra).
"""

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo_jax.common import storage
from grpo_jax.common.metrics import read_scalars


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the per-step reward of 128 completions is noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _grpo_scalars(workdir: str) -> dict:
    tb = storage.path(workdir) / "tb"  # local, or an object store's URI
    if not tb.is_dir() and (tb.parent / "grpo" / "tb").is_dir():
        tb = tb.parent / "grpo" / "tb"  # a run with a cold start: its GRPO stage
    s = read_scalars(tb) if tb.is_dir() else {}
    if "reward" not in s:
        raise SystemExit(f"no training metrics in {tb}")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", action="append", help="a run (repeat to compare runs on one plot); default runs/default")
    ap.add_argument("--label", action="append", default=[], help="each --workdir's name in the legend")
    ap.add_argument("--out", default=None, help="default: WORKDIR/metrics.png (the first run's own folder)")
    ap.add_argument("--smooth", type=int, default=25, help="moving-average window of the reward curve")
    args = ap.parse_args()
    workdirs = args.workdir or ["runs/default"]
    if args.label and len(args.label) != len(workdirs):
        raise SystemExit(f"{len(args.label)} --label for {len(workdirs)} --workdir; expected one each")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, workdir in enumerate(workdirs):
        s = _grpo_scalars(workdir)
        name = f"{args.label[k]}: " if args.label else ""
        color = {"color": f"C{k}"} if len(workdirs) > 1 else {}
        for tag, label in (("rewards/math/mean", "train accuracy (sampled, moving avg)"),):
            if tag in s:
                steps, values = zip(*s[tag])
                ax.plot(steps, smooth(list(values), args.smooth), lw=1, alpha=0.6, label=name + label,
                        **(color or {"color": "tab:gray"}))
        for tag, label, style in (("eval/pass@1", "held-out pass@1 (greedy)", "o-"),
                                  ("eval/mean@1_sampled", "held-out accuracy (sampled, T=1)", "s--")):
            if tag in s:
                steps, values = zip(*s[tag])
                ax.plot(steps, values, style, label=name + label, **color)
    ax.set_xlabel("GRPO step (after the cold-start SFT)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right" if len(workdirs) > 1 else "lower right", fontsize="small")
    fig.tight_layout()
    out = storage.path(args.out or f"{workdirs[0]}/metrics.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    out.write_bytes(image.getvalue())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
