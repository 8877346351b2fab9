"""Learning curves of a run: loss and metric against step, train and val, from metrics.csv."""
from pathlib import Path

from diagssm.train.metrics import read_rows


def plot_curves(run_dir, out=None, metric_name=None):
    """Draw `run_dir`/metrics.csv into `out` (default `run_dir`/curves.png); return the path.
    `metric_name` labels the metric axis (default: the task's, from the run's config.yaml)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv; is {run_dir} a run folder (diagssm train --run-dir)?")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    metric_name = metric_name or metric_name_of(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "metric", metric_name)):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r["split"] == split and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if metric_name != "accuracy":
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def metric_name_of(run_dir):
    """The task's metric, from the run's config.yaml ("metric" if the folder has none)."""
    config = Path(run_dir) / "config.yaml"
    if not config.exists():
        return "metric"
    from diagssm.train.config import load
    from diagssm.train.setup import make_task

    return make_task(load(config)).metric
