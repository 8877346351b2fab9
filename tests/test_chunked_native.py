"""ops.chunked_native: the chunked SSM on native kernels, against the recurrence (its reference twin)
and the PyTorch path; its build, cache and fallbacks."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diagssm.cpu import cpu_flags
from diagssm.ops import chunked_native
from diagssm.ops.chunked import diagonal_chunked, diagonal_chunked_ref
from helpers import assert_close, randn

C128, C64 = torch.complex128, torch.complex64
needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")


def system(H=16, M=4, seed=0, Cp=1):
    """float64 system and inputs of an H-channel, M-mode SSM with Cp output channels (D included)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.complex(-torch.rand(H, M, generator=g, dtype=torch.float64) * 0.3,
                      torch.randn(H, M, generator=g, dtype=torch.float64))
    return dict(w=w, B_bar=randn(H, M, dtype=C128, seed=seed + 1), C=randn(Cp, H, M, dtype=C128, seed=seed + 2),
                D=randn(Cp, H, seed=seed + 3))


def as32(t):
    return t.to(C64 if t.is_complex() else torch.float32)


def run(fn, u, h0, params, gy, gh, **kw):
    """Outputs and the gradients of <y, gy> + Re<h, gh> with respect to u, h0 and the parameters."""
    leaves = [t.clone().requires_grad_() for t in [u, h0, *params.values()]]
    y, h = fn(leaves[0], *leaves[2:5], 2, leaves[1], D=leaves[5], **kw)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh.conj()).real.sum(), leaves)
    return y, h, grads


@needs_native
@pytest.mark.parametrize("B,L,H,M,chunk,block_numbers,Cp", [
    (2, 64, 16, 4, 16, None, 1),  # one block
    (2, 160, 16, 4, 16, 2 * 2 * 8 * 16, 1),  # 10 chunks in blocks of 2
    (3, 120, 32, 2, 8, 3 * 3 * 4 * 32, 1),  # 15 chunks in blocks of 3: the first block in time is shorter
    (1, 256, 16, 8, 64, None, 1),  # the default chunk length
    (2, 100, 16, 4, 16, None, 1),  # a last chunk of 4 real steps
    (3, 130, 32, 2, 8, 3 * 3 * 4 * 32, 1),  # 17 chunks, the last of 2 steps, blocks of 3
    (2, 5, 16, 4, None, None, 1),  # shorter than one chunk (T = 8)
    (2, 100, 16, 4, 16, None, 2),  # two output channels: chunks of y are (2 T, H) rows
    (3, 130, 32, 2, 8, 3 * 3 * 4 * 32, 3),  # three, in time blocks, a last chunk of 2 steps
    (2, 100, 40, 4, 16, None, 1),  # H = 40 on 48 lanes (`apply_on_lanes`: zero channels appended, cut off)
    (3, 130, 100, 2, 8, 3 * 3 * 4 * 112, 2),  # H = 100 on 112 lanes, two output channels, in time blocks
])
@pytest.mark.parametrize("fused", [True, False], ids=["chunks_fwd", "three-calls"])
def test_matches_recurrence_outputs_and_gradients(B, L, H, M, chunk, block_numbers, Cp, fused, monkeypatch):
    """Both forwards: the full chunks in one pass (`chunks_fwd`, RB = 8 chunks at a time: 10, 15 and 17
    chunks end in a partial group) and as three calls (sums, carry, outputs)."""
    monkeypatch.setattr(chunked_native, "FUSED_FORWARD", fused)
    if block_numbers:
        monkeypatch.setattr(chunked_native, "BLOCK_NUMBERS", block_numbers)
    p = system(H, M, Cp=Cp)
    u, h0 = randn(B, L, H, seed=5), randn(B, H, M, dtype=C128, seed=6)
    gy, gh = randn(B, L, Cp, H, seed=7), randn(B, H, M, dtype=C128, seed=8)
    want = run(diagonal_chunked_ref, u, h0, p, gy, gh)
    got = run(diagonal_chunked, as32(u), as32(h0), {k: as32(v) for k, v in p.items()}, as32(gy), as32(gh),
              chunk=chunk, native=True)
    assert got[0].dtype == torch.float32 and got[0].shape == (B, L, Cp, H)
    assert_close(got[0], want[0], scale=10)
    assert_close(got[1], want[1], scale=10)
    for g, w in zip(got[2], want[2]):  # sums over up to B L steps
        assert_close(g, w, scale=30)  # the worst measured: 2.1


@needs_native
def test_lazily_negated_input_and_gradient():
    """A lazy -u (PyTorch's negative bit: memory holds u) must reach the kernels as -u (here the chunk
    copies had resolved it already; the step ops and s5_fused read it as u: test_step_native, test_s5_native)."""
    p = {k: as32(v) for k, v in system().items()}
    u, gy = randn(2, 40, 16, seed=3).float(), randn(2, 40, 1, 16, seed=4).float()
    neg = torch._neg_view(u).requires_grad_()
    y, _ = diagonal_chunked(neg, p["w"], p["B_bar"], p["C"], 2, D=p["D"])
    y.backward(torch._neg_view(gy))
    u_ref = (-u).requires_grad_()
    y_ref, _ = diagonal_chunked_ref(u_ref, p["w"], p["B_bar"], p["C"], 2, D=p["D"])
    y_ref.backward(-gy)
    assert_close(y, y_ref, scale=10)
    assert_close(neg.grad, u_ref.grad, scale=10)


@pytest.mark.parametrize("native", [True, False] if chunked_native.available() else [False])
def test_a_conjugated_state_gradient(native):
    """A loss on x.conj() sends a lazily conjugated gradient; the PyTorch path's view_as_real refused it."""
    p = {k: as32(v) for k, v in system().items()}
    u, c = randn(2, 40, 16, seed=3).float(), randn(2, 16, 4, dtype=C64, seed=5)
    grads = []
    for fn, kw in ((diagonal_chunked, {"native": native}), (diagonal_chunked_ref, {})):
        leaf = u.clone().requires_grad_()
        _, x = fn(leaf, p["w"], p["B_bar"], p["C"], 2, **kw)
        (x.conj() * c).real.sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1], scale=10)


def chunk_rows(B, n, K, H, seed):
    """Rows (b, c) of a (B, n, K, H) float32 view into a longer (B, L, H) tensor, as the op passes u."""
    x = randn(B, n * K + 8, H, dtype=torch.float32, seed=seed)
    return x[:, :n * K].view(B, n, K, H)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tri,cp", [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)])
def test_row_kernels_match_float64_contractions(threads, tri, cp):
    """rows_mm and rows_red alone, on 3 x 13 rows: blocks of rows and register tiles that do not
    divide them, two lane tiles, row strides of a (B, L, H) tensor; per thread count. rows_red also
    as the op's backward calls it: twice, its threads' sums kept over both calls and added at the end.
    tri: W1 triangular as a Toeplitz block of cp outputs per step (tri = 1) or its transpose (2)."""
    B, n, K, I, H = 3, 13, 16, 12, 32
    A1, A2, Bm = chunk_rows(B, n, K, H, 20), chunk_rows(B, n, 8, H, 21), chunk_rows(B, n, I, H, 22)
    W1, W2 = randn(K, I, H, dtype=torch.float32, seed=23), randn(8, I, H, dtype=torch.float32, seed=24)
    k, i = torch.arange(K)[:, None], torch.arange(I)[None, :]
    if tri:  # the kernel reads only the triangle that it is told is non-zero
        W1 = W1 * ((k <= i // cp) if tri == 1 else (k // cp >= i))[..., None]
    lib = chunked_native.library()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        C = torch.full((B, n, I, H), float("nan"))
        chunked_native._mm(lib, C, A1, chunked_native._tiles(W1), A2, chunked_native._tiles(W2), tri=tri, cp=cp)
        G = chunked_native._tiles(randn(K, I, H, dtype=torch.float32, seed=25))
        G0 = chunked_native._untile(G).double()
        chunked_native._red(lib, G, A1, Bm, tri=min(tri, 1), cp=cp)
        G_again = chunked_native._tiles(G0.float())
        chunked_native._red(lib, G_again, A1, Bm, tri=min(tri, 1), cp=cp)
        G_twice = chunked_native._tiles(G0.float())  # as the op's backward: two calls, one set of thread sums
        parts = chunked_native._partials(lib, G_twice, B * n)
        for _ in range(2):
            chunked_native._red(lib, G_twice, A1, Bm, tri=min(tri, 1), parts=parts, cp=cp)
        chunked_native._add_parts(G_twice, parts)
    finally:
        torch.set_num_threads(before)
    want = torch.einsum("bckh,kih->bcih", A1.double(), W1.double()) + torch.einsum(
        "bckh,kih->bcih", A2.double(), W2.double())
    assert_close(C, want, scale=10)
    got_G, want_G = chunked_native._untile(G), G0 + torch.einsum("bckh,bcih->kih", A1.double(), Bm.double())
    keep = (k <= i // cp) if tri else torch.ones(K, I, dtype=torch.bool)  # tri = 1: the rest is left partly summed
    assert_close(got_G[keep], want_G[keep], scale=30)
    assert torch.equal(chunked_native._untile(G_again)[keep], got_G[keep])  # the same sums, in the same order
    assert_close(chunked_native._untile(G_twice)[keep], (2 * want_G - G0)[keep], scale=30)


@needs_native
@pytest.mark.parametrize("I", [8, 12, 64])
def test_weight_tiling_matches_its_reference(I):
    """`_tiles` and `_untile` (the library's tile_weights) against their PyTorch twins, from and into
    strided views as the op uses them: (K, I, H) slices of (H, K', I') weights, permuted either way."""
    K, H = 16, 32
    W = randn(H, K + 4, I + 2, dtype=torch.float32, seed=26)  # larger arrays: slices have offsets, strides
    WT = randn(H, I + 2, K + 4, dtype=torch.float32, seed=27)
    for w in (W[:, 2:K + 2, 1:I + 1].permute(1, 2, 0), WT[:, 1:I + 1, 2:K + 2].permute(2, 1, 0)):
        t = chunked_native._tiles(w)
        assert torch.equal(t, chunked_native._tiles_ref(w))
        assert torch.equal(chunked_native._untile(t), chunked_native._untile_ref(t))
        out = torch.full((H, K + 3, I + 1), float("nan"))
        view = out[:, 3:, 1:].permute(1, 2, 0)  # (K, I, H) with strides and an offset
        chunked_native._untile(t, view)
        assert torch.equal(view, w)
        assert out[:, :3].isnan().all() and out[:, :, :1].isnan().all()  # nothing written outside the view
    with pytest.raises(TypeError, match="float32"):  # raw memory of another dtype: an error, not a wrong answer
        chunked_native._tiles(W.double()[:, :K, :I].permute(1, 2, 0))
    with pytest.raises(ValueError, match="out must be"):
        chunked_native._untile(t, torch.empty(K, I + 1, H))


@needs_native
@pytest.mark.parametrize("Cp", [1, 2])
def test_matches_the_pytorch_path(Cp):
    p = {k: as32(v) for k, v in system(32, 8, seed=3, Cp=Cp).items()}
    u, h0 = randn(2, 1000, 32, dtype=torch.float32, seed=9), randn(2, 32, 8, dtype=C64, seed=10)
    gy, gh = randn(2, 1000, Cp, 32, dtype=torch.float32, seed=11), randn(2, 32, 8, dtype=C64, seed=12)
    native, torch_path = (run(diagonal_chunked, u, h0, p, gy, gh, native=n) for n in (True, False))
    for a, b in zip(native[:2] + native[2], torch_path[:2] + torch_path[2]):
        assert_close(a, b, scale=100)


@needs_native
def test_used_by_default_where_it_can_run():
    p = {k: as32(v) for k, v in system().items()}
    u = randn(2, 64, 16, dtype=torch.float32, seed=13).requires_grad_()
    y, _ = diagonal_chunked(u, p["w"], p["B_bar"], p["C"], chunk=16)
    assert type(y.grad_fn).__name__ == "ChunkedNativeBackward"
    y_torch, _ = diagonal_chunked(u, p["w"], p["B_bar"], p["C"], chunk=16, native=False)
    assert type(y_torch.grad_fn).__name__ != "ChunkedNativeBackward"


@needs_native
def test_backward_keeps_u_and_the_chunk_states_only():
    p = {k: as32(v) for k, v in system(16, 4).items()}
    u = randn(2, 640, 16, dtype=torch.float32, seed=14).requires_grad_()  # T = 8 = 2M: 80 chunks
    saved = []

    def pack(t):
        saved.append(t.numel() * (2 if t.is_complex() else 1))  # in floats
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = diagonal_chunked(u, p["w"], p["B_bar"], p["C"], chunk=8, native=True)
    big = sorted(saved)[-2:]
    assert big == [u.numel(), u.numel() * 81 // 80]  # u, and the states entering chunks 0..80
    assert sum(saved) - sum(big) < u.numel() / 4
    y.sum().backward()
    assert torch.isfinite(u.grad).all()
    saved.clear()  # a non-contiguous u (dense() copies it for the kernels): still saved once
    u_t = randn(2, 16, 640, dtype=torch.float32, seed=14).transpose(1, 2).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = diagonal_chunked(u_t, p["w"], p["B_bar"], p["C"], chunk=8, native=True)
    assert sorted(saved)[-2:] == big and sum(saved) - sum(big) < u.numel() / 4


@pytest.mark.parametrize("case,why", [
    (dict(dtype=torch.float64), "float32 on the CPU only"),
    (dict(H=3), "H = 3 would run on 16 lanes (a multiple of 16): over 1.2x the channels"),
    (dict(H=20), "H = 20 would run on 32 lanes"),
    (dict(chunk=6), "the chunk length must be a multiple of 4"),
    (dict(M=3), "an even number of modes"),
])
def test_falls_back_where_it_cannot_run_and_says_why(case, why):
    H, M, L, C_out, T = case.get("H", 16), case.get("M", 4), 64, case.get("C_out", 1), case.get("chunk", 16)
    dt = case.get("dtype", torch.float32)
    p = system(H, M)
    w, B_bar = p["w"].to(C64 if dt == torch.float32 else C128), p["B_bar"].to(C64 if dt == torch.float32 else C128)
    C = randn(C_out, H, M, dtype=B_bar.dtype, seed=15)
    u = randn(2, L, H, dtype=dt, seed=16)
    assert why in chunked_native.unsupported(u, C_out, T, M)
    with pytest.raises(ValueError, match="native=True"):
        diagonal_chunked(u, w, B_bar, C, chunk=T, native=True)
    y, _ = diagonal_chunked(u, w, B_bar, C, chunk=T)  # the PyTorch path
    y_ref, _ = diagonal_chunked_ref(u.double(), w.to(C128), B_bar.to(C128), C.to(C128))
    assert_close(y, y_ref, scale=100)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache in tmp_path, and the loaded library forgotten (restored afterwards)."""
    monkeypatch.setattr(chunked_native, "_state", {})
    monkeypatch.setenv("DIAGSSM_CACHE", str(tmp_path))
    monkeypatch.delenv("DIAGSSM_NATIVE", raising=False)
    return tmp_path


def test_without_a_compiler_it_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    assert not chunked_native.available()
    assert "could not build native.c" in chunked_native.why_unavailable()
    assert os.listdir(fresh_build) == []  # no half-written library left
    p = {k: as32(v) for k, v in system().items()}
    u = randn(2, 64, 16, dtype=torch.float32, seed=17)
    with pytest.raises(ValueError, match="could not build"):
        diagonal_chunked(u, p["w"], p["B_bar"], p["C"], native=True)
    y, _ = diagonal_chunked(u, p["w"], p["B_bar"], p["C"])
    p64 = system()
    assert_close(y, diagonal_chunked_ref(u.double(), p64["w"], p64["B_bar"], p64["C"])[0], scale=100)


def test_switched_off_by_the_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("DIAGSSM_NATIVE", "0")
    assert not chunked_native.available()
    assert chunked_native.why_unavailable() == "DIAGSSM_NATIVE=0"


@needs_native
def test_built_once_into_the_cache(fresh_build):
    assert chunked_native.available()
    files = os.listdir(fresh_build)
    assert len(files) == 1 and files[0].startswith("native-") and files[0].endswith(".so")
    mtime = os.path.getmtime(fresh_build / files[0])
    chunked_native._state.clear()  # as a new process would: finds the library, does not rebuild
    assert chunked_native.available()
    assert os.listdir(fresh_build) == files and os.path.getmtime(fresh_build / files[0]) == mtime


def test_logs_which_kernels_run(caplog, monkeypatch):
    monkeypatch.setattr(chunked_native, "_paths", {})
    p = system()
    u = randn(2, 64, 16, seed=18)
    with caplog.at_level("INFO", logger="diagssm.ops.chunked"):
        diagonal_chunked(u, p["w"], p["B_bar"], p["C"])  # float64
        diagonal_chunked(u, p["w"], p["B_bar"], p["C"])  # the same: said once
    assert [r.getMessage() for r in caplog.records] == [
        "chunked SSM op: PyTorch kernels (float32 on the CPU only (got torch.float64 on cpu))"]
    if chunked_native.available():
        with caplog.at_level("INFO", logger="diagssm.ops.chunked"):
            diagonal_chunked(as32(u), *(as32(p[k]) for k in ("w", "B_bar", "C")))
        assert caplog.records[-1].getMessage() == "chunked SSM op: native kernels"


# the x86-64 targets that give native.c's tiles each vector width (floats, `vector_floats()`), and the
# CPU flags a machine needs to run each
MARCHES = {"x86-64": (4, set()), "haswell": (8, {"avx2", "fma"}),
           "skylake-avx512": (16, {"avx512f", "avx512bw", "avx512dq", "avx512vl"})}
x86_with_cc = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("cc"),
                                 reason="the x86-64 targets need an x86-64 machine with cc")


@x86_with_cc
@pytest.mark.parametrize("march", MARCHES)
def test_builds_for_every_vector_width_without_a_warning(march, tmp_path):
    """native.c's register tiles are sized per vector width; a tile sized for AVX-512 once failed
    to build on an AVX2 machine, which then ran the slower PyTorch path."""
    cmd = ["cc", f"-march={march}", *chunked_native.FLAGS, "-Wall", "-Wextra", "-Werror", "-o",
           str(tmp_path / "k.so"), str(chunked_native.SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@x86_with_cc
@needs_native
@pytest.mark.parametrize("march", MARCHES)
def test_other_vector_widths_pass_the_native_tests(march, tmp_path):
    """The native kernels' tests again, in a process whose kernels are built for `march`, where this
    CPU runs it and its tiles differ from those of this process's build (which this run tests)."""
    floats, needs = MARCHES[march]
    if floats == chunked_native.vector_floats():
        pytest.skip(f"{march}: the vector width of this process's build")
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    env = dict(os.environ, DIAGSSM_NATIVE_MARCH=march, DIAGSSM_CACHE=str(tmp_path))
    root = Path(__file__).resolve().parents[1]
    probe = "from diagssm.ops import chunked_native as c; print(c.available() and c.vector_floats())"
    built = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert built.stdout.strip() == str(floats), built.stderr[-3000:]
    files = ["tests/test_chunked_native.py", "tests/test_s5_native.py", "tests/test_scan_native.py",
             "tests/test_step_native.py", "tests/test_double_backward.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k",
                           "not vector_width"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]
    assert "skipped" not in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("bad", [torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.float64),
                                 torch.ones(4, device="meta"), torch.ones(4, dtype=torch.complex128)])
def test_a_pointer_for_the_kernels_is_float32_on_the_cpu(bad):
    """The kernels read raw float32: another dtype or device had been read as garbage or written past
    its end (S4's dense carry under autocast corrupted the heap; a meta state read as none)."""
    with pytest.raises(TypeError, match="native kernels take float32 or complex64 CPU tensors"):
        chunked_native.ptr(bad)
    t = torch.ones(4)
    assert chunked_native.ptr(t) == t.data_ptr() and chunked_native.ptr(None) is None
    assert chunked_native.ptr(t.to(torch.complex64)) != 0
