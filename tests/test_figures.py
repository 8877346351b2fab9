"""figures: each plot writes a PNG and returns the numbers it drew, checked against their sources."""
import csv

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="matplotlib is the optional plotting dependency")

from diagssm import figures, init  # noqa: E402
from diagssm.layers import DSS, S4, S4D, S5  # noqa: E402
from diagssm.models import SequenceModel  # noqa: E402
from helpers import assert_close  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
F64 = torch.float64


def is_png(path):
    return path.read_bytes()[:8] == PNG


def test_plot_eigenvalues(tmp_path):
    N = 16
    spectra = figures.plot_eigenvalues(tmp_path / "eig.png", N=N, s5_blocks=4, seed=0)
    assert is_png(tmp_path / "eig.png")
    for name in ("legs", "inv", "lin", "real"):
        assert np.array_equal(spectra[name], init.diagonal_init(name, N).numpy()), name
    assert np.array_equal(spectra["rand"], init.diagonal_init("rand", N, torch.Generator().manual_seed(0)).numpy())
    assert np.array_equal(spectra["s5"], init.hippo_n_blocks(N, 4)[0].numpy())
    assert np.array_equal(spectra["normal"][N // 2:], spectra["legs"])  # the kept half of S's spectrum
    # the layers start from these spectra (stored in float32)
    assert np.allclose(DSS(1, N).Lambda().detach().numpy(), spectra["legs"], rtol=1e-6, atol=1e-6)
    assert np.allclose(S5(1, N, blocks=4).Lambda().detach().numpy(), spectra["s5"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.sort(spectra["hippo_legs"].real), -np.arange(N, 0, -1.0))


def test_hippo_legs_spectrum_is_ill_conditioned():
    """HiPPO-LegS at N = 64: eig(A) is exactly -1 .. -N (lower triangular), but a perturbation of
    relative size 1e-14 moves some eigenvalue by > 10 (measured 57): cond(V) ~ 1e20."""
    N = 64
    exact, perturbed, cond = figures.hippo_legs_spectrum(N)
    assert np.array_equal(np.sort(exact.real), -np.arange(N, 0, -1.0)) and not exact.imag.any()
    assert np.abs(perturbed - exact[:, None]).min(0).max() > 10
    assert cond > 1e19


def test_hippo_legs_small_is_well_conditioned():
    """At N = 8 (cond(V) = 7.7e4) the same perturbation moves nothing visibly."""
    exact, perturbed, cond = figures.hippo_legs_spectrum(8)
    assert 1e4 < cond < 1e5
    assert np.abs(np.sort_complex(perturbed) - np.sort_complex(exact)).max() < 1e-8


def small_layers():
    torch.manual_seed(0)
    return {"s4d": S4D(3, 8).double(), "dss": DSS(3, 8).double(), "s4": S4(3, 8).double(),
            "s5": S5(3, 8).double()}


def test_plot_kernels(tmp_path):
    layers = small_layers()
    torch.manual_seed(1)
    model = SequenceModel(2, 2, d_model=3, n_layers=2, layer_kwargs={"d_state": 8}).double()
    kernels = figures.plot_kernels(tmp_path / "k.png", {**layers, "model": model}, L=40, n_channels=2)
    assert is_png(tmp_path / "k.png")
    assert all(K.shape == (2, 40) and K.dtype == np.float64 for K in kernels.values())
    with torch.no_grad():
        assert np.array_equal(kernels["s4d"], layers["s4d"].kernel(40)[0, :2].numpy())
        assert np.array_equal(kernels["model"], model.blocks[0].layer.kernel(40)[0, :2].numpy())
    last = figures.plot_kernels(tmp_path / "k1.png", {"model": model}, L=40, n_channels=3, layer_index=-1)
    with torch.no_grad():
        assert np.array_equal(last["model"], model.blocks[1].layer.kernel(40)[0].numpy())
    with pytest.raises(ValueError, match="layer_index=2 but model has 2 SSM layers"):
        figures.plot_kernels(tmp_path / "k2.png", {"model": model}, layer_index=2)


@pytest.mark.parametrize("name", ["s4d", "dss", "s4", "s5"])
def test_layer_kernel_is_the_impulse_response(name):
    """K[h, l] = y[l, h] - D[h] delta_l for a unit impulse on channel h (S5: its diagonal entry)."""
    layer = small_layers()[name]
    K = figures.layer_kernel(layer, 30)  # (H, L)
    for h in range(3):
        u = torch.zeros(1, 30, 3, dtype=F64)
        u[0, 0, h] = 1.0
        with torch.no_grad():
            y = layer(u)[0, :, h]  # (L,)
            y[0] -= layer.D.reshape(-1)[h]
        assert_close(torch.from_numpy(K[h]), y, scale=100)


def test_plot_step_sizes(tmp_path):
    layers = small_layers()
    torch.manual_seed(2)
    model = SequenceModel(2, 2, d_model=3, n_layers=3, layer="s5", layer_kwargs={"d_state": 8}).double()
    dts = figures.plot_step_sizes(tmp_path / "dt.png", {**layers, "model": model})
    assert is_png(tmp_path / "dt.png")
    assert np.array_equal(dts["s4d"][0], torch.exp(layers["s4d"].log_dt).detach().numpy())
    assert dts["dss"][0].shape == (6,)  # sep_dt: steps of Re and Im, (2, H)
    assert dts["s5"][0].shape == (4,)  # per mode: M = P/2
    assert len(dts["model"]) == 3
    for dt, block in zip(dts["model"], model.blocks):
        assert np.array_equal(dt, torch.exp(block.layer.log_dt).detach().numpy())


def write_metrics(run_dir, rows):
    run_dir.mkdir()
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("step", "epoch", "split", "loss", "metric", "lr", "time"))
        w.writerows(rows)


def test_plot_learning_curves(tmp_path):
    for seed in range(2):
        write_metrics(tmp_path / f"a{seed}", [(10, 0, "train", 2.0, 0.3, 1e-3, 1.0),
                                              (10, 0, "val", 1.5 + seed, 0.4, 1e-3, 1.0),
                                              (20, 1, "train", 1.0, 0.6, 1e-3, 2.0),
                                              (20, 1, "val", 0.9 + seed, 0.7, 1e-3, 2.0)])
    write_metrics(tmp_path / "b", [(5, 0, "val", 3.0, 0.2, 1e-3, 1.0)])
    runs = {"model a": [tmp_path / "a0", tmp_path / "a1"], "model b": str(tmp_path / "b")}
    curves = figures.plot_learning_curves(tmp_path / "lc.png", runs, metric_name="accuracy")
    assert is_png(tmp_path / "lc.png")
    assert [len(v) for v in curves.values()] == [2, 1]
    assert np.array_equal(curves["model a"][1]["step"], [10, 20])
    assert np.array_equal(curves["model a"][1]["loss"], [2.5, 1.9])
    assert np.array_equal(curves["model b"][0]["metric"], [0.2])
    train = figures.plot_learning_curves(tmp_path / "tr.png", {"a": tmp_path / "a0"}, split="train")
    assert np.array_equal(train["a"][0]["metric"], [0.3, 0.6])


def test_errors(tmp_path):
    with pytest.raises(TypeError, match="load it first"):
        figures.plot_kernels(tmp_path / "x.png", {"sd": S4D(3, 8).state_dict()})
    with pytest.raises(ValueError, match="no SSM layer"):
        figures.plot_step_sizes(tmp_path / "x.png", {"lin": torch.nn.Linear(2, 2)})
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        figures.plot_learning_curves(tmp_path / "x.png", {"a": tmp_path / "missing"})
    write_metrics(tmp_path / "t", [(10, 0, "train", 2.0, 0.3, 1e-3, 1.0)])
    with pytest.raises(ValueError, match="no 'val' rows"):
        figures.plot_learning_curves(tmp_path / "x.png", {"a": tmp_path / "t"})
