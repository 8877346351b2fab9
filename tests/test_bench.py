"""diagssm.bench: the naive baselines equal the layers they are timed against (outputs and
gradients, float64), the odd-even associative scan equals the loop, and the driver runs."""
import argparse
import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, randn

from diagssm import bench
from diagssm.layers import DSS, S4D, S5
from diagssm.ops import chunked_native, scan_ref

Bsz, H, L, N = 2, 4, 100, 8


def _layer(cls, **kw):
    torch.manual_seed(0)
    return cls(H, N, **kw).double()


CASES = [
    ("s4d", lambda: _layer(S4D, backend="fft")),
    ("s4d", lambda: _layer(S4D, backend="chunked")),
    ("dss", lambda: _layer(DSS, sep_dt=True, backend="fft")),
    ("dss", lambda: _layer(DSS, sep_dt=False, backend="chunked")),
    ("s5", lambda: _layer(S5, mode="scan")),
    ("s5", lambda: _layer(S5, mode="conv")),
]


@pytest.mark.parametrize("name, make", CASES)
def test_naive_equals_layer_outputs_and_gradients(name, make):
    layer = make()
    u = randn(Bsz, L, H).requires_grad_()
    w = randn(Bsz, L, H, seed=1)
    y_naive, y = bench.NAIVE[name](layer, u), layer(u)
    assert_close(y_naive, y)
    params = [u] + list(layer.parameters())
    g_naive = torch.autograd.grad((y_naive * w).sum(), params)
    g = torch.autograd.grad((y * w).sum(), params)
    for a, b in zip(g_naive, g):
        assert_close(a, b, scale=10)  # sums over L and the batch


@pytest.mark.parametrize("length", [1, 2, 3, 17, 64])
def test_associative_scan_equals_loop(length):
    a = randn(3, length, 5, dtype=torch.complex128)
    b = randn(3, length, 5, dtype=torch.complex128, seed=1)
    prod, h = bench.associative_scan(a, b)
    assert prod.shape == h.shape == (3, length, 5)
    assert_close(h, scan_ref(a, b))
    assert_close(prod, torch.cumprod(a, dim=1))


def test_associative_scan_on_the_s5_system_equals_scan_ref():
    layer = _layer(S5)
    Lambda_bar = torch.exp(torch.complex(layer.Lambda_re, layer.Lambda_im) * torch.exp(layer.log_dt))  # (M,)
    Bu = randn(Bsz, L, layer.n_modes, dtype=torch.complex128)
    _, h = bench.associative_scan(Lambda_bar * torch.ones_like(Bu), Bu)
    assert_close(h, scan_ref(Lambda_bar, Bu))


def test_naive_rejects_a_layer_it_does_not_implement():
    with pytest.raises(ValueError, match="discretization='zoh'"):
        bench.s4d_naive(S4D(H, N, discretization="bilinear"), torch.randn(1, 8, H))


def test_naive_skip_extrapolates_memory_and_time():
    args = argparse.Namespace(max_gb=16.0, max_seconds=120.0, repeats=3)
    assert bench.naive_skip("s4d", 1024, None, args) == ""  # a priori 0.125 GB
    # a priori at 65536: 2 Vandermonde tensors (128, 32, 65536) complex64 + 4 (16, 128, 65536) complex64
    assert bench.naive_skip("s4d", 65536, None, argparse.Namespace(max_gb=4.0, max_seconds=1.0)) == "skipped (~8.0 GB)"
    prev = dict(L=16384, peak_mb=5000.0, fwd_ms=2000.0, fwdbwd_ms=4000.0, first_fwdbwd_ms=5000.0)
    # memory: 5000 MB x 4 = 19.5 GB > 16 GB
    assert bench.naive_skip("s4d", 65536, prev, args) == "skipped (~19.5 GB, ~110 s)"
    # time: 4 x (16/14) x (2 + 4) s x (1 + 3) passes = 110 s <= 120 s; at 2x the time it is skipped
    assert bench.naive_skip("s4d", 65536, dict(prev, peak_mb=100.0), args) == ""
    slow = dict(prev, peak_mb=100.0, fwd_ms=4000.0, fwdbwd_ms=8000.0, first_fwdbwd_ms=8000.0)
    assert bench.naive_skip("s4d", 65536, slow, args) == "skipped (~0.4 GB, ~219 s)"


def test_cost_of_the_chunked_path_is_the_documented_formula():
    flops, nbytes = bench.cost("s4d", "chunked", 1024)
    B, H_, M, T = 16, 128, 32, 64
    assert flops == 2 * B * 1024 * H_ * (T + 4 * M)  # PyTorch's matmuls: the whole Toeplitz block
    assert nbytes == 4 * B * 1024 * H_ * 8 + 8 * B * H_ * M * (1024 / T) * 4  # PyTorch kernels' layout copies
    native_bytes = 4 * B * 1024 * H_ * 3 + 8 * B * H_ * M * (1024 / T) * 4  # u read twice, y written once
    native_flops = 2 * B * 1024 * H_ * (T / 2 + 4 * M)  # the native kernels skip the block's zero half
    assert bench.cost("s4d", "chunked", 1024, native=True) == (native_flops, native_bytes)
    flops, nbytes = bench.cost("s5", "scan", 1024)
    assert nbytes == 4 * B * 1024 * H_ * 2 + 8 * B * 1024 * M * 6  # B u, h and the scan's passes in memory
    assert bench.cost("s5", "scan", 1024, native=True) == (flops, 4 * B * 1024 * H_ * 2 + 8 * B * 1024 * M)
    for impl in ("fft", "scan", "conv", "dplr"):
        f, b = bench.cost("x", impl, 1024)
        assert f > 0 and b > 0 and math.isfinite(f + b)


def test_cost_of_s4s_paths():
    """S4's chunked path: the Toeplitz block (its half on the native kernels), N in, N out and the
    dense carry's N^2 / T per step;
    its fft path is what the results before session 25 called "dplr"."""
    B, H_, N_, T, L = 16, 128, 64, 64, 4096
    flops, nbytes = bench.cost("s4", "chunked", L)
    assert flops == 2 * B * L * H_ * (T + 2 * N_ + N_ * N_ / T)
    assert nbytes == 4 * B * L * H_ * 8 + 4 * B * H_ * N_ * (L / T) * 4
    native_bytes = 4 * B * L * H_ * 3 + 4 * B * H_ * N_ * (L / T) * 4  # on the native kernels: u twice, y once
    native_flops = 2 * B * L * H_ * (T / 2 + 2 * N_ + N_ * N_ / T)
    assert bench.cost("s4", "chunked", L, native=True) == (native_flops, native_bytes)
    assert bench.ran_native(dict(layer="s4", impl="chunked", paths={chunked_native.DENSE_OP: ""}))
    assert not bench.ran_native(dict(layer="s4", impl="chunked", paths={chunked_native.DENSE_OP: "native=False"}))
    assert not bench.ran_native(dict(layer="s4", impl="chunked", paths={chunked_native.CHUNKED_OP: ""}))
    assert bench.cost("s4", "fft", L) == bench.cost("s4", "dplr", L) != bench.cost("s4d", "fft", L)
    assert bench.FAST["s4"] == ("chunked", "fft")


def test_main_inline_runs_every_case_and_writes_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--inline", "--layers", "s4d", "--lengths", "64", "--threads", "1",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["layer"], r["impl"], r["L"]) for r in report["results"]] == [
        ("s4d", "chunked", 64), ("s4d", "fft", 64), ("s4d", "naive", 64)]
    for r in report["results"]:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_mb"] is None
    assert [r["impl"] for r in report["limits"]] == ["chunked", "fft"]
    assert all(r["gflop"] > 0 and r["over_floor"] > 0 for r in report["limits"])
    native = report["results"][0]["paths"] == {chunked_native.CHUNKED_OP: ""}  # the native kernels ran (where built)
    assert native == chunked_native.available()
    assert [r["native"] for r in report["limits"]] == [native, False]
    (t,) = report["throughput"]
    assert t["step_tokens_s"] > 0 and t["step_1thread_tokens_s"] > 0 and t["full_tokens_s"] > 0
    text = capsys.readouterr().out
    assert "| s4d | 64 | chunked |" in text and "| s4d | 64 | naive |" in text


def test_from_json_reprints_a_saved_run_without_measuring(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--inline", "--layers", "dss", "--lengths", "64", "--threads", "1",
                       "--json", str(out)]) == 0
    first = capsys.readouterr().out
    saved = json.loads(out.read_text())
    saved["limits"] = "stale"  # recomputed from the results with this version's cost
    out.write_text(json.dumps(saved))
    monkeypatch.setattr(bench, "run_case", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(bench, "measure_case", lambda *a, **k: pytest.fail("measured"))
    again = tmp_path / "again.json"
    assert bench.main(["--from-json", str(out), "--json", str(again)]) == 0
    assert capsys.readouterr().out == first
    assert json.loads(again.read_text())["limits"] == json.loads(json.dumps(bench.limits(
        saved["results"], bench.parse_args([]))))


def test_limits_keep_the_fast_paths_of_older_runs():
    """S4's fft path was "dplr" before session 25; `--from-json` of such a run had dropped its row
    from the limits table (the saved report has it)."""
    saved = Path(__file__).resolve().parents[1] / "docs/benchmarks/layers-cpu-2core-session19-avx2-run1"
    rows = bench.limits(json.loads(saved.with_suffix(".json").read_text())["results"], bench.parse_args([]))
    assert ("s4", "dplr", 65536) in {(r["layer"], r["impl"], r["L"]) for r in rows}
    assert "| s4 | dplr | 65536 |" in saved.with_suffix(".md").read_text()
    assert not any(r["impl"] == "naive" for r in rows)


def test_from_json_of_a_gpu_run_keeps_its_device_and_peaks(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--inline", "--layers", "s5", "--lengths", "64", "--threads", "1",
                       "--json", str(out)]) == 0
    capsys.readouterr()
    saved = json.loads(out.read_text())  # as a GPU run saves it (tests/test_gpu.py runs one)
    saved.update(device="cuda", cpu="Some GPU (CUDA 13.0)", peaks=dict(gflops=50000.0, gbs=3000.0))
    out.write_text(json.dumps(saved))
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: pytest.fail("measured"))
    assert bench.main(["--from-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(GPU, float32)" in text and "device cuda: Some GPU (CUDA 13.0)." in text
    assert "floors at 50000 GFLOP/s and 3000 GB/s" in text


@pytest.mark.parametrize("argv, said", [
    (["--repeats", "0"], "--repeats must be >= 1; got 0"),  # was taken as the default, 3
    (["--lengths", "1024", "0"], "--lengths must be >= 1; got 0"),
    (["--peak-gflops", "0"], "--peak-gflops must be a finite number > 0; got 0.0"),  # was the default, 300
    (["--peak-gbs", "-3"], "--peak-gbs must be a finite number > 0; got -3.0"),
    (["--peak-gbs", "inf"], "--peak-gbs must be a finite number > 0; got inf"),
])
def test_bad_numbers_are_errors_naming_the_option(argv, said, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert said in capsys.readouterr().err


def test_explicit_numbers_are_kept():
    args = bench.parse_args(["--repeats", "1", "--peak-gflops", "150", "--peak-gbs", "10"])
    assert (args.repeats, args.peak_gflops, args.peak_gbs) == (1, 150.0, 10.0)
    assert bench.parse_args(["--quick"]).repeats == 1 and bench.parse_args([]).repeats == 3


def test_a_bad_device_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])
    assert "--device='tpu' is not a device name" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["bench_chunked", "bench_backends"])
def test_the_benchmark_scripts_name_a_bad_device(name, capsys):
    """They check --device as `diagssm bench` does (`train.world.check_device`), before any work."""
    script = benchmark_script(name)
    for device, said in (("tpu", "--device='tpu' is not a device name"),
                         ("xla", "--device='xla': supported device types are cpu and cuda")):
        with pytest.raises(SystemExit):
            script.main(["--device", device])
        assert said in capsys.readouterr().err


@pytest.mark.skipif(not bench._reset_high_water_mark(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_is_not_hidden_by_an_earlier_peak():
    """The CPU peak had been the ru_maxrss increase: memory freed before start() (the warm-up's)
    hid as much of the measured pass's peak (L = 1024 cases read up to half their true peak)."""
    def touched(mb):
        return torch.ones(int(mb * bench.MB) // 4)  # float32, every page written

    big = touched(400)
    del big  # freed: resident memory falls, the high-water mark stays
    peak = bench.PeakMemory("cpu")
    peak.start()
    small = touched(100)
    assert 90 < peak.mb() < 200  # its own 100 MB (the old measure gave 0 here: under the earlier mark)
    del small


# 39 MB in 10,000 heap blocks of 4 KB, each written, freed with the 64 MB pad of every diagssm command
# kept (`cpu.keep_freed_memory`), then as much again inside PeakMemory: prints the peak it read
KEPT_PEAK = """
import ctypes
from diagssm import bench, cpu
assert cpu.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def touched():
    blocks = [libc.malloc(4096) for _ in range(10_000)]
    for b in blocks:
        ctypes.memset(b, 1, 4096)
    return blocks
for b in reversed(touched()):
    libc.free(b)
peak = bench.PeakMemory("cpu")
peak.start()
again = touched()
print(peak.mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or
                    not bench._reset_high_water_mark(), reason="glibc on Linux only")
def test_peak_memory_counts_what_reuses_freed_heap_memory():
    """The heap's kept free memory was reused without raising resident memory, so peaks below the pad
    read low (by ~12% for the small benchmark cases); start() returns it to the system first."""
    out = subprocess.run([sys.executable, "-c", KEPT_PEAK], capture_output=True, text=True, check=True)
    assert 37 < float(out.stdout) < 60  # its own 39 MB (4.1e7 B); 0.0 before the fix


def test_a_subprocess_case_reports_memory_and_its_settings():
    args = argparse.Namespace(device="cpu", inline=False, repeats=1, threads=1)
    r = bench.run_case("s5", "scan", 64, args)
    assert "skipped" not in r, r.get("skipped")
    assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_mb"] >= 0
    assert r["thp"] == "1" and r["flush_denormal"] is True and r["threads"] == 1
    assert r["allocator"] == bench.allocator()


def test_the_header_names_the_allocator(monkeypatch):
    args = argparse.Namespace(device="cpu", inline=False, repeats=1, threads=1)
    row = dict(layer="s5", impl="scan", L=64, flush_denormal=True, thp="1")
    assert "Allocator: the C library's malloc." in bench.header(args, [dict(row, allocator="")])
    monkeypatch.setenv("LD_PRELOAD", "/lib/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "retain:true")
    assert bench.allocator() == "LD_PRELOAD=/lib/libjemalloc.so.2 MALLOC_CONF=retain:true"
    assert "Allocator: LD_PRELOAD=/lib/libjemalloc.so.2 MALLOC_CONF=retain:true." in bench.header(
        args, [dict(row, allocator=bench.allocator())])


def test_the_header_says_whether_freed_memory_was_kept():
    """Runs saved before keep_freed_memory existed have no top_pad: it was not set."""
    args = argparse.Namespace(device="cpu", inline=False, repeats=1, threads=1)
    row = dict(layer="s5", impl="scan", L=64, flush_denormal=True, thp="1", allocator="")
    said = "Malloc top pad (diagssm.cpu.keep_freed_memory): "
    assert said + "not set." in bench.header(args, [row])
    assert said + "64 MB." in bench.header(args, [dict(row, top_pad=64 << 20)])
    assert said + "not set; 64 MB." in bench.header(args, [dict(row, top_pad=0), dict(row, top_pad=64 << 20)])


def benchmark_script(name):
    """benchmarks/NAME.py loaded as a module (the folder is not a package)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_bench_chunked_script_times_the_op_and_an_older_file(tmp_path, capsys):
    script = benchmark_script("bench_chunked")
    older = tmp_path / "older.py"  # an op without D or block: the harness adds D u itself
    older.write_text("from diagssm.ops.chunked import diagonal_chunked_ref as _ref\n"
                     "def diagonal_chunked(u, w, B_bar, C, factor=2, h0=None, chunk=None):\n"
                     "    return _ref(u, w, B_bar, C, factor, h0)\n")
    for extra in ([], ["--module", str(older)]):
        assert script.main(["--L", "64", "--repeats", "1", "--threads", "1", "--block", "1"] + extra) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("fwd+bwd median" in line and "peak" in line for line in out)
    assert "{'block': 1}" in out[0] and "older.py" in out[1]


def test_bench_chunked_script_picks_the_kernels(capsys):
    script = benchmark_script("bench_chunked")
    kernels = ["torch"] + (["native"] if chunked_native.available() else [])
    for k in kernels:
        assert script.main(["--L", "256", "--repeats", "1", "--threads", "1", "--kernels", k]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [("'native': False" in line, "'native': True" in line) for line in out] == [
        (k == "torch", k == "native") for k in kernels]


def test_bench_s5_times_each_piece(capsys):
    script = benchmark_script("bench_s5")
    assert script.main(["--L", "64", "--repeats", "1", "--threads", "1"]) == 0
    line = capsys.readouterr().out.strip()
    ms = dict(re.findall(r"(\w+) ([0-9.]+)(?:,|;|$)", line.split("): ", 1)[1]))
    fused = {"fused"} if chunked_native.available() else set()
    assert set(ms) == {"mix_in", "mix_out", "scan", "skip", "loss", "sum"} | fused
    assert all(float(v) > 0 for v in ms.values())


def test_bench_step_times_each_piece(capsys):
    script = benchmark_script("bench_step")
    assert script.main(["--layers", "s4d", "s5", "--calls", "2", "--repeats", "1", "--threads", "1"]) == 0
    rows = dict(re.findall(r"^\| (.+) \| ([0-9.]+) \| [0-9.]+ \|$", capsys.readouterr().out, re.M))
    pieces = ("layer.step", "block.step", "model.step (4 blocks)")
    want = [f"{name}: {what}" for name in ("s4d", "s5") for what in pieces]
    ops = [f"ops.{fn} (B 16, H 128, 32 modes)" for fn in ("diagonal_step", "diagonal_step_ref", "s5_native.s5_step",
                                                          "s5_native.s5_step_ref")]
    ops += [f"ops.{fn} (B 16, H 128, 32 modes, rank 1)" for fn in ("dplr_step", "dplr_step_ref")]
    assert sorted(rows) == sorted(want + ops)
    assert all(float(v) > 0 for v in rows.values())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_bench_s5_times_the_whole_layer_and_names_its_path(bidirectional, capsys):
    script = benchmark_script("bench_s5")
    argv = ["--L", "64", "--repeats", "1", "--threads", "1", "--layer"] + (["--bidirectional"] if bidirectional else [])
    assert script.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("S5 layer" + (" bidirectional" if bidirectional else "") + ", fwd+bwd")
    assert float(re.search(r"L=64: ([0-9.]+) ms", line).group(1)) > 0
    fused = chunked_native.available() and not bidirectional
    assert line.endswith("fused native op") if fused else "PyTorch ops: " in line


def test_bench_s5_times_a_layer_of_other_sizes(capsys):
    """H = 40, d_state 28 (14 modes): the fused op on padded lanes (48 and 32) where it is built."""
    script = benchmark_script("bench_s5")
    assert script.main(["--L", "64", "--repeats", "1", "--threads", "1", "--layer", "--H", "40", "--N", "28"]) == 0
    line = capsys.readouterr().out.strip()
    assert "B=16 H=40 P=28 L=64: " in line
    assert line.endswith("fused native op") if chunked_native.available() else "PyTorch ops: " in line
    with pytest.raises(SystemExit, match="2"):
        script.main(["--H", "40"])
    assert "--H and --N go with --layer" in capsys.readouterr().err


def test_bench_chunked_script_takes_output_channels(capsys):
    script = benchmark_script("bench_chunked")
    # the loss weights y (B, L, C', H) flattened to 2 H columns: an op that left out a channel fails here
    assert script.main(["--L", "256", "--repeats", "1", "--threads", "1", "--channels", "2"]) == 0
    out = capsys.readouterr().out
    assert "C'=2" in out and "fwd+bwd median" in out


def test_bench_s5_times_the_fused_op_per_block_size(capsys):
    from diagssm.ops import s5_native
    if not chunked_native.available():
        pytest.skip(f"native kernels unavailable: {chunked_native.why_unavailable()}")
    default = s5_native.TB
    script = benchmark_script("bench_s5")
    assert script.main(["--L", "64", "--repeats", "1", "--threads", "1", "--tb", "16", "32"]) == 0
    assert s5_native.TB == default  # the script puts the block size back
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in out] == ["fused TB=16", "fused TB=32"]
    assert all(float(x) > 0 for line in out for x in re.findall(r"([0-9.]+) ms", line))


def test_bench_chunked_parts_prints_matmul_rates_and_a_layout_pass(capsys):
    script = benchmark_script("bench_chunked")
    assert script.main(["--L", "256", "--repeats", "1", "--threads", "1", "--parts"]) == 0
    out = capsys.readouterr().out.splitlines()
    rates = [float(m.group(1)) for line in out if "native" not in line
             for m in [re.search(r"([0-9.]+) GFLOP/s", line)] if m]
    assert len(rates) == 4 and all(r > 0 for r in rates)  # three bmm shapes and the square mm
    assert "(128, 64, 128) @ (128, 128, 64)" in out[1]  # one time block: 4 chunks x B = 16 rows per channel
    layout = [line for line in out if "layout pass" in line]
    assert len(layout) == 1 and re.search(r"of u \(16, 256, 128\) into chunk layout: [0-9.]+ ms", layout[0])
    system = [line for line in out if "system side" in line]  # each helper against its reference twin
    assert len(system) == (3 if chunked_native.available() else 2)
    assert all(len(re.findall(r" [0-9.]+ ms", line)) == 2 for line in system)
    native = [line for line in out if "native" in line and "system side" not in line]
    if chunked_native.available():
        rates, forward = native[:2], native[2:]
        assert len(rates) == 2 and all(re.search(r"[0-9.]+ GFLOP/s$", line) for line in rates)
        assert len(forward) == 2 and all(re.search(r"native forward, .*, 64 chunks: [0-9.]+ ms$", line)
                                         for line in forward)
    else:
        assert len(native) == 1 and "not timed" in native[0]


def test_bench_chunked_sections_time_the_helpers_and_restore_them(capsys):
    import diagssm.ops.chunked as chunked
    script = benchmark_script("bench_chunked")
    before = chunked._load
    assert script.main(["--L", "300", "--repeats", "2", "--threads", "1", "--sections", "--kernels", "torch"]) == 0
    assert chunked._load is before  # the wrappers are gone
    line = capsys.readouterr().out.splitlines()[-1]
    ms = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)", line.split(":", 1)[1])}
    assert set(ms) == {"forward", "backward", "_load", "_store", "_states", "_put_states"}
    assert all(v > 0 for v in ms.values())
    assert ms["_states"] < ms["forward"] and ms["_put_states"] < ms["backward"]


@pytest.mark.skipif(not chunked_native.available(), reason="native kernels unavailable")
def test_bench_chunked_sections_of_the_native_path(capsys):
    script = benchmark_script("bench_chunked")
    before = chunked_native._mm
    assert script.main(["--L", "256", "--repeats", "2", "--threads", "1", "--sections", "--kernels", "native"]) == 0
    assert chunked_native._mm is before
    line = capsys.readouterr().out.splitlines()[-1]
    ms = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)", line.split(":", 1)[1])}
    assert set(ms) == {"forward", "backward", "_chunks_fwd", "_mm", "_red", "_carry", "_carry_back"}
    # B = 16 >= 1 thread: the forward's full chunks run in one pass, which carries their states itself;
    # `_carry` is then the last chunk's alone, which may print as 0.0
    assert all(v > 0 for k, v in ms.items() if k != "_carry")
    assert ms["_chunks_fwd"] + ms["_carry"] < ms["forward"] and ms["_red"] + ms["_carry_back"] < ms["backward"]


@pytest.mark.skipif(not chunked_native.available(), reason="native kernels unavailable")
def test_bench_chunked_pads_lanes_as_told_and_restores_the_limit(capsys):
    """--H 20 runs on 32 lanes only with --pad-limit >= 1.6; --sections then times the native helpers."""
    script = benchmark_script("bench_chunked")
    limit = chunked_native.PAD_LIMIT
    argv = ["--L", "256", "--repeats", "2", "--threads", "1", "--H", "20", "--kernels", "native"]
    with pytest.raises(ValueError, match="H = 20 would run on 32 lanes"):
        script.main(argv)
    assert script.main(argv + ["--pad-limit", "2", "--sections"]) == 0
    assert chunked_native.PAD_LIMIT == limit
    first, last = capsys.readouterr().out.splitlines()
    assert "H=20 " in first and "'native': True" in first
    assert {"_chunks_fwd", "_mm", "_red"} <= set(re.findall(r"(\w+) [0-9.]+", last.split(":", 1)[1]))
    with pytest.raises(SystemExit, match="2"):
        script.main(argv + ["--pad-limit", "0.5"])
    assert "--pad-limit must be >= 1" in capsys.readouterr().err


def test_one_case_with_profile_prints_its_op_table(capsys):
    assert bench.main(["--one", "s5", "scan", "64", "--repeats", "1", "--threads", "1", "--profile"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["layer"] == "s5" and r["impl"] == "scan" and r["fwdbwd_ms"] > 0
    # the fused S5 op where the native kernels are built, else the projections B u and Re(C x)
    assert "Self CPU" in err and ("S5Fused" if chunked_native.available() else "aten::mm") in err
    with pytest.raises(SystemExit, match="2"):
        bench.parse_args(["--profile"])
    assert "--profile goes with --one" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["dss", "s4"])
def test_bench_backends_times_both_backends_per_dtype_and_length(capsys, name):
    script = benchmark_script("bench_backends")
    argv = ["--layers", name, "--dtypes", "float32", "float64", "--lengths", "70", "--repeats", "1",
            "--threads", "1", "--batch", "2", "--width", "4"]
    assert script.main(argv) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {name} ")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("float32", "70"), ("float64", "70")]
    for r in rows:
        chunked, fft, ratio = float(r[3]), float(r[4]), float(r[5])
        assert chunked > 0 and fft > 0  # ms to 0.1: the ratio, from the unrounded times, agrees to that
        assert abs(ratio - fft / chunked) <= (0.05 / fft + 0.05 / chunked) * ratio + 0.005
        assert r[6].strip() == "chunked"  # what "auto" picks on the CPU


@pytest.mark.parametrize("flags,vectors", [("fpu avx2 fma avx512f avx512bw", "AVX-512"), ("fpu avx avx2 fma", "AVX2"),
                                           ("fpu sse2", "no AVX2")])
def test_cpu_model_names_family_model_and_vector_width(flags, vectors, tmp_path):
    """Machines of one name (AMD EPYC) came with and without AVX-512; the report's header tells them apart."""
    cpu = "processor\t: {}\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: {}\n\n"
    info = tmp_path / "cpuinfo"
    info.write_text(cpu.format(0, flags) + cpu.format(1, flags))
    assert bench.cpu_model(str(info)) == f"AMD EPYC (2 logical CPUs; family 25 model 17, {vectors})"
    assert bench.cpu_model(str(tmp_path / "missing")) == "unknown"


def test_bench_cpu_times_denormals_and_huge_pages(capsys):
    """benchmarks/bench_cpu.py on a small tensor, 2 threads: both cases print their two timings, and
    flushing takes effect on every thread (it had been set after torch's threads started, so half the
    outputs of a 2-thread pass stayed denormal); this process's setting is untouched."""
    script = benchmark_script("bench_cpu")
    flushing = (torch.tensor([1e-40]) * 1.0).item() == 0.0  # as earlier tests in this process left it
    assert script.main(["--shape", "2", "4096", "32", "--repeats", "1", "--threads", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("torch ") and "(2, 4096, 32)" in out[0]
    clone = [line for line in out if "clone()" in line]
    assert len(clone) == 1 and len(re.findall(r"[0-9.]+ ms", clone[0])) == 2
    denormal = [line for line in out if "denormals" in line]
    assert len(denormal) == 1
    assert "cannot flush" in denormal[0] or (len(re.findall(r"[0-9.]+ ms", denormal[0])) == 2
                                             and "; 0% of the flushed outputs denormal" in denormal[0])
    assert ((torch.tensor([1e-40]) * 1.0).item() == 0.0) == flushing  # this process's setting is untouched


def test_bench_ops_runs_each_case_in_a_subprocess_set_up_as_the_layer_benchmark(tmp_path, capsys):
    script = benchmark_script("bench_ops")
    out = tmp_path / "ops.json"
    script.main(["--lengths", "64", "--repeats", "1", "--ops", "scan", "--threads", "1", "--json", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"fast", "ref"}
    for r in rows.values():
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_extra_mb"] >= 0
        assert r["thp"] == "1" and r["flush_denormal"] is True and r["threads"] == 1
    printed = capsys.readouterr().out
    assert "set_flush_denormal(True): set; THP_MEM_ALLOC_ENABLE=1: set" in printed
    assert "| scan | 64 | fast |" in printed and "| scan | 64 | ref |" in printed
