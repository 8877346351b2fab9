"""Figures of the study (issue #8): the spectra of the initialisations, trained kernels, learned
step sizes and learning curves over runs.

Every function draws with matplotlib's Agg backend, saves a PNG at `path` and returns the numbers
it plotted (float64 / complex128 numpy arrays), so that tests and documents can check them.

References: S4D (Gu, Gupta, Goel, Re 2022, Sec. 4: S4D-LegS, -Inv, -Lin, -Real, -Rand); DSS (Gupta,
Gu, Berant 2022: Skew-HiPPO, the spectrum of HiPPO-LegS's normal part, = S4D-LegS); S5 (Smith,
Warrington, Linderman 2023, Sec. 4.3: block-diagonal HiPPO-N).
"""
import math
from pathlib import Path

import numpy as np
import torch

from diagssm import hippo, init
from diagssm.layers.base import SSMLayer, as_complex
from diagssm.layers.s5 import S5

PERTURBATION = 1e-14  # ||E||_2 / ||A||_2 of the rounding-sized perturbation of HiPPO-LegS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    fig.clf()
    _pyplot().close(fig)
    return Path(path)


# --- (a) eigenvalues of the initialisations --------------------------------------------------------

def hippo_legs_spectrum(N, seed=0):
    """The spectrum of the non-normal HiPPO-LegS matrix A, by numpy's float64 eig: exactly
    -1, ..., -N (A is lower triangular), yet ill-conditioned: the eigenvalues of A + E with a
    random ||E||_2 = 1e-14 ||A||_2 move far (by ~60 at N = 64), because the eigenvector matrix V
    has cond_2(V) ~ 1e20 (why S4 does not diagonalise A, and S4D drops the low-rank term instead).

    Returns (eig(A) (N,), eig(A + E) (N,) complex128, cond_2(V))
    """
    A = hippo.transition("legs", N)[0].numpy()  # (N, N)
    Lambda, V = np.linalg.eig(A)
    E = np.random.default_rng(seed).standard_normal((N, N))
    E *= PERTURBATION * np.linalg.norm(A, 2) / np.linalg.norm(E, 2)
    return Lambda.astype(np.complex128), np.linalg.eigvals(A + E).astype(np.complex128), np.linalg.cond(V)


def init_spectra(N=64, s5_blocks=4, seed=0):
    """The state matrices' eigenvalues at initialisation, for a real state of size N.

    Diagonal initialisations keep one mode per conjugate pair (Im >= 0, N/2 modes):
    "legs" (S4D-LegS = DSS's Skew-HiPPO, the DSS layer's init), "inv", "lin", "real", "rand"
    (`init.diagonal_init`, S4D-Rand seeded by `seed`), "s5" (S5's HiPPO-N in `s5_blocks` blocks,
    `init.hippo_n_blocks`). Full spectra (N modes): "normal" (HiPPO-LegS's normal part S,
    `init.hippo_n`), "hippo_legs" and "hippo_legs_perturbed" (`hippo_legs_spectrum`).

    Returns {name: (n,) complex128 numpy array}
    """
    g = torch.Generator().manual_seed(seed)
    spectra = {name: init.diagonal_init(name, N, g).numpy() for name in init.NAMES}
    spectra["s5"] = init.hippo_n_blocks(N, s5_blocks)[0].numpy()
    spectra["normal"] = init.hippo_n(N)[0].numpy()
    spectra["hippo_legs"], spectra["hippo_legs_perturbed"], _ = hippo_legs_spectrum(N, seed)
    return spectra


EIGEN_PANELS = (("hippo_legs", "HiPPO-LegS A (non-normal)"), ("normal", "HiPPO-LegS normal part S (all N)"),
                ("legs", "S4D-LegS = DSS Skew-HiPPO"), ("s5", "S5 HiPPO-N, {J} blocks"), ("inv", "S4D-Inv"),
                ("lin", "S4D-Lin"), ("real", "S4D-Real"), ("rand", "S4D-Rand"))


def plot_eigenvalues(path, N=64, s5_blocks=4, seed=0):
    """Figure: one complex-plane panel per initialisation (Re on x, Im on a shared symlog y axis),
    the HiPPO-LegS panel with eig(A) (dots) and eig(A + E), ||E|| = 1e-14 ||A|| (crosses).
    Returns `init_spectra(N, s5_blocks, seed)`."""
    plt = _pyplot()
    spectra = init_spectra(N, s5_blocks, seed)
    cond = hippo_legs_spectrum(N, seed)[2]
    fig, axes = plt.subplots(2, 4, figsize=(15, 7), sharey=True)
    for ax, (key, title) in zip(axes.flat, EIGEN_PANELS):
        z = spectra[key]
        ax.plot(z.real, z.imag, ".", ms=5, label="eig(A)" if key == "hippo_legs" else None)
        if key == "hippo_legs":
            zp = spectra["hippo_legs_perturbed"]
            ax.plot(zp.real, zp.imag, "x", ms=4, label=f"eig(A + E), |E| = {PERTURBATION:g} |A|")
            ax.legend(fontsize=7)
            title += f"\ncond(V) = {cond:.1e}"
        ax.set_title(f"{title.format(J=s5_blocks)} ({len(z)} modes)", fontsize=9)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlim(1.1 * min(z.real.min(), zp.real.min() if key == "hippo_legs" else 0) - 0.1, 0.1)  # Re = 0 shown
        ax.set_xlabel("Re")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("Im")
    fig.suptitle(f"Eigenvalues of the state matrix at initialisation, N = {N} "
                 f"(diagonal inits: one mode per conjugate pair)")
    _save(fig, path)
    return spectra


# --- (b) kernels of trained layers -----------------------------------------------------------------

def ssm_layers(module):
    """The SSM layers inside a layer, block or model, in order."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected an nn.Module (an SSM layer, a block or a SequenceModel); got "
                        f"{type(module).__name__}. For a state_dict, build the model and load it first "
                        f"(e.g. diagssm.train.commands.load_run)")
    layers = [m for m in module.modules() if isinstance(m, SSMLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} contains no SSM layer")
    return layers


def s5_kernel(layer, L):
    """S5's MIMO impulse response from input h to output h (the diagonal of its (H, H) kernel):
        K[h, l] = factor Re sum_m C_tilde[h, m] Lambda_bar_m^l B_bar[m, h]
    Shapes: returns (H, L)"""
    A_bar, B_scale = layer.discrete()  # (M,), (M,)
    l = torch.arange(L, dtype=layer.Lambda_re.dtype)  # (L,)
    powers = torch.exp(torch.log(A_bar)[:, None] * l)  # (M, L) Lambda_bar^l
    B, C = as_complex(layer.B) * B_scale[:, None], as_complex(layer.C)[0]  # (M, H), (H, M)
    return layer.factor * torch.einsum("hm,ml,mh->hl", C, powers, B).real  # (H, L)


def layer_kernel(layer, L):
    """The SSM kernel of each channel, without D: (H, L) (the causal half; S5: its diagonal)."""
    with torch.no_grad():
        K = s5_kernel(layer, L) if isinstance(layer, S5) else layer.kernel(L)[0]  # (H, L)
    return K.double().cpu().numpy()


def _nth_layer(name, module, index):
    layers = ssm_layers(module)
    if not -len(layers) <= index < len(layers):
        raise ValueError(f"layer_index={index} but {name} has {len(layers)} SSM layers")
    return layers[index]


def plot_kernels(path, models, L=256, n_channels=4, layer_index=0):
    """Figure: the convolution kernels K[h, l] of the first `n_channels` channels of SSM layer
    `layer_index` of each model, one panel per model.

    models: {name: nn.Module}: a layer, a block or a SequenceModel (trained: load its checkpoint
    first). Returns {name: (n_channels, L) float64 array}.
    """
    plt = _pyplot()
    kernels = {name: layer_kernel(_nth_layer(name, m, layer_index), L)[:n_channels] for name, m in models.items()}
    fig, axes = plt.subplots(len(kernels), 1, figsize=(8, 2.2 * len(kernels)), squeeze=False, sharex=True)
    for ax, (name, K) in zip(axes[:, 0], kernels.items()):
        for h, k in enumerate(K):
            ax.plot(k, lw=1, label=f"channel {h}")
        ax.set_title(f"{name}: layer {layer_index}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=n_channels)
    axes[-1, 0].set_xlabel("lag l")
    _save(fig, path)
    return kernels


# --- (c) learned step sizes ------------------------------------------------------------------------

def step_sizes(module):
    """dt = exp(log_dt) of every SSM layer (per channel; S5: per mode; DSS with sep_dt: both rows)."""
    return [torch.exp(layer.log_dt.detach()).flatten().double().cpu().numpy() for layer in ssm_layers(module)]


def plot_step_sizes(path, layers_by_name, bins=30):
    """Figure: histograms of log10 dt, one panel per name, one outline per SSM layer.

    layers_by_name: {name: nn.Module} (a layer, block or model). Returns {name: [dt per layer]}.
    """
    plt = _pyplot()
    dts = {name: step_sizes(m) for name, m in layers_by_name.items()}
    cols = min(len(dts), 3)
    rows = math.ceil(len(dts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, per_layer) in zip(axes.flat, dts.items()):
        edges = np.linspace(*_log_range(per_layer), bins + 1)
        for i, dt in enumerate(per_layer):
            ax.hist(np.log10(dt), bins=edges, histtype="step", lw=1.2, label=f"layer {i}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("log10 dt")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(dts):]:
        ax.axis("off")
    _save(fig, path)
    return dts


def _log_range(arrays):
    lo, hi = min(np.log10(a).min() for a in arrays), max(np.log10(a).max() for a in arrays)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


# --- (d) learning curves over runs -----------------------------------------------------------------

def run_curves(run_dir, split="val"):
    """(step, loss, metric) arrays of one run's `split` rows, from its metrics.csv
    (`diagssm.train.metrics.read_rows`)."""
    from diagssm.train.metrics import read_rows

    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv; is {run_dir} a run folder (diagssm train --run-dir)?")
    rows = [r for r in read_rows(path) if r["split"] == split and r["metric"] is not None]
    if not rows:
        raise ValueError(f"{path} has no {split!r} rows")
    return {key: np.array([r[key] for r in rows], dtype=np.float64) for key in ("step", "loss", "metric")}


def plot_learning_curves(path, runs, split="val", metric_name=None):
    """Figure: loss and metric against step for several runs, one colour per label (e.g. per model),
    one line per run (e.g. per seed). A single run's own figure is `diagssm.train.curves.plot_curves`.

    runs: {label: run folder or list of run folders}; metric_name labels the metric axis (default:
    the first run's task metric, as `plot_curves` finds it); not "accuracy": log scales.
    Returns {label: [run_curves(run) for each run]}.
    """
    from diagssm.train.curves import metric_name_of

    plt = _pyplot()
    dirs = {label: [d] if isinstance(d, (str, Path)) else list(d) for label, d in runs.items()}
    curves = {label: [run_curves(d, split) for d in ds] for label, ds in dirs.items()}
    metric_name = metric_name or metric_name_of(next(iter(dirs.values()))[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for color, (label, per_run) in enumerate(curves.items()):
        for i, c in enumerate(per_run):
            for ax, key in zip(axes, ("loss", "metric")):
                ax.plot(c["step"], c[key], color=f"C{color % 10}", lw=1, alpha=0.8, label=label if i == 0 else None)
    for ax, name in zip(axes, ("loss", metric_name)):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} {name}")
        ax.grid(alpha=0.3)
        if metric_name != "accuracy":
            ax.set_yscale("log")
    axes[1].legend(fontsize=7)
    _save(fig, path)
    return curves
