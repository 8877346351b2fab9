"""`diagssm plot`: the figures of the docs, from the library's inits or from trained runs.

    diagssm plot convergence            S4-LegS basis kernels against S4D-LegS as N grows (S4D paper)
    diagssm plot eigenvalues            every initialisation's eigenvalues, with HiPPO-LegS and its normal part
    diagssm plot kernels RUN...         convolution kernels of trained models (first SSM layer; --length lags)
    diagssm plot step-sizes RUN...      histograms of learned step sizes, per layer
    diagssm plot curves RUN...          validation curves of several runs (seeds of a model share a colour)
    diagssm plot RUN                    one run's learning curves (to RUN/curves.png)

A run's label is its model's folder name in a study layout (<runs>/<study>/<model>/seed<k>), else
the run folder's name.
"""
from pathlib import Path

FIGURES = ("convergence", "eigenvalues", "kernels", "step-sizes", "curves")
DEFAULT_OUT = {"convergence": "convergence.png", "eigenvalues": "eigenvalues.png",  # the current folder
               "kernels": "kernels.png", "step-sizes": "step_sizes.png", "curves": "curves.png"}


def run_label(run_dir):
    run_dir = Path(run_dir)
    return run_dir.parent.name if run_dir.name.startswith("seed") else run_dir.name


def trained_models(runs, checkpoint):
    """{label: model with the checkpoint's weights} (the first run of each label)."""
    from diagssm.train.commands import load_run

    models = {}
    for run in runs:
        models.setdefault(run_label(run), load_run(run, checkpoint)[2])
    return models


def cmd_plot(args):
    if args.what not in FIGURES:  # a run folder: its own curves
        if args.runs:
            raise ValueError(f"diagssm plot {args.what}: unknown figure; allowed: {', '.join(FIGURES)} "
                             "or a single run folder")
        from diagssm.train.commands import cmd_plot_run

        return cmd_plot_run(args.what, args.out)
    needs_runs = args.what in ("kernels", "step-sizes", "curves")
    if needs_runs != bool(args.runs):
        takes = "one or more run folders" if needs_runs else "no run folder"
        raise ValueError(f"diagssm plot {args.what} takes {takes}")
    out = args.out or DEFAULT_OUT[args.what]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if args.what == "convergence":
        from diagssm.theory import plot_convergence

        print("relative L2 error of the first four basis kernels, S4D-LegS (B/2) against S4-LegS:", flush=True)
        plot_convergence(out, report=lambda N, err: print(f"  N = {N:5d}: {err:.3g}", flush=True))
    elif args.what == "eigenvalues":
        from diagssm.figures import plot_eigenvalues

        spectra = plot_eigenvalues(out, N=args.d_state)
        print(f"eigenvalues at N = {args.d_state}: " + ", ".join(spectra))
    else:
        from diagssm import figures

        if args.what == "curves":
            groups = {}
            for run in args.runs:
                groups.setdefault(run_label(run), []).append(run)
            figures.plot_learning_curves(out, groups)
        elif args.what == "kernels":
            figures.plot_kernels(out, trained_models(args.runs, args.checkpoint), L=args.length)
        else:
            figures.plot_step_sizes(out, trained_models(args.runs, args.checkpoint))
    print(f"saved {out}")
    return 0


def add_plot(sub):
    plot = sub.add_parser("plot", help="draw a figure", description=__doc__.split("\n\n")[0])
    plot.add_argument("what", help=f"one of {', '.join(FIGURES)}; or a run folder (its learning curves)")
    plot.add_argument("runs", nargs="*", help="run folders, for kernels, step-sizes and curves")
    plot.add_argument("--out", help="where to save the PNG (defaults: " +
                      ", ".join(f"{k}: {v}" for k, v in DEFAULT_OUT.items()) + "; a run: <run>/curves.png)")
    plot.add_argument("--checkpoint", default="best", help="which checkpoint of each run: best (default), latest")
    plot.add_argument("--d-state", type=int, default=64, help="N for the eigenvalue figure (default 64)")
    plot.add_argument("--length", type=int, default=256,
                      help="kernels: how many lags to draw (default 256; a task's length shows its long-range taps)")
    plot.set_defaults(run=cmd_plot)
