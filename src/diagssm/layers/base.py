"""What every SSM layer shares: input checks, parameter helpers, and the convolution/recurrence
machinery of H independent diagonal SISO systems (S4D, DSS).

A per-channel diagonal layer describes its discretised system by three tensors,

    w     (H, M)      complex, log A_bar: x_k = exp(w) x_{k-1} + B_bar u_k
    B_bar (H, M)      complex
    C     (C', H, M)  complex, y_k = factor Re sum_n C x_k + D u_k   (C' = channels, x2 if bidirectional)

and its convolution kernel K (C', H, L) = factor Re sum_n C B_bar exp(w l), which the subclass
computes with the fast op of its paper. `factor` is 2 for a conjugate-symmetric state (N/2
stored modes stand for N) and 1 otherwise.
"""
import functools
import logging
import math
import numbers

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from diagssm import hippo
from diagssm.ops import chunked_native, fft_conv
from diagssm.ops.chunked import diagonal_chunked
from diagssm.ops.step import diagonal_step
from diagssm.ops.kernels import vandermonde_contract, vandermonde_sum

log = logging.getLogger("diagssm")

# Optimizer steps taken in this process (any torch.optim optimizer, by a global post-step hook): part
# of the inference cache's key, since fused optimizers (Adam(fused=True), ...) update the parameters in
# place without bumping their version counters.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs):
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)
BACKENDS = ("auto", "fft", "chunked")


def _autocast_on(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): the input checks say what is wrong
        return False


def _input(args, kwargs):
    """A layer call's input: its first positional argument, or u= (forward) / u_t= (step)."""
    if args:
        return args[0]
    return kwargs.get("u", kwargs.get("u_t"))


def autocast_off(method):
    """A layer's `forward` or `step` that runs with torch.autocast off for its input's device: under
    autocast a float16 / bfloat16 input (from an autocast op before the layer) is cast to the layer's
    float32 (or float64), and the layer computes and returns that, on every path. Its exponentials,
    powers and scans lose too much below float32, and the native kernels read float32 only;
    autocast inside the layer had given results that depended on the path (bfloat16 matmuls in
    some, errors in others). Without autocast the method runs as written."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        u = _input(args, kwargs)
        if torch.is_tensor(u) and _autocast_on("cpu" if u.is_cpu else u.device.type):  # (is_cpu: a step's fast path)
            return self._in_float32(method, *args, **kwargs)
        return method(self, *args, **kwargs)
    return run


class NonFiniteInput(ValueError):
    """A layer's input holds NaN or infinite values (the trainer reports it as divergence)."""


def complex_parameter(z):
    """A complex tensor stored as a real (..., 2) parameter (optimisers and DDP see real numbers)."""
    return nn.Parameter(torch.view_as_real(z.to(torch.complex64).contiguous()).clone())


def as_complex(p):
    return torch.view_as_complex(p)


def log_uniform(shape, low, high, generator=None):
    """exp(U[log low, log high]): the papers' step-size initialisation."""
    if not 0 < low <= high < math.inf:
        raise ValueError(f"dt_min={low} and dt_max={high} must satisfy 0 < dt_min <= dt_max < inf")
    r = torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.exp(r * (math.log(high) - math.log(low)) + math.log(low))


def check_backend(backend, who):
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend={backend!r}; allowed: {BACKENDS}")
    return backend


def check_positive_ints(who, **values):
    """Each of `values` (name=value) is an int >= 1 (bool is not), else a ValueError naming it
    (`hippo._check_int`)."""
    for name, value in values.items():
        hippo._check_int(name, value, 1, who)


def check_bools(who, **flags):
    """Each of `flags` (name=value) is True or False (Python's or numpy's bool), else a ValueError naming
    it (`hippo._check_bool`): 'no' or 2 would otherwise pass as true (bidirectional=2 doubled the output
    channels). Returns the values as Python bools, in the order given."""
    return tuple(hippo._check_bool(name, value, who) for name, value in flags.items())


def check_rate(rate, name="rate"):
    """rate scales every layer's dt (a change of sampling rate): a finite real number > 0 (Python's or
    numpy's, not a tensor), else a ValueError. 0 would freeze the state; a negative or infinite rate
    would make the modes grow or the output NaN, silently."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < math.inf:
        raise ValueError(f"{name}={rate!r} is not allowed; expected a positive finite number (it multiplies dt)")
    return rate


def check_length(L):
    """A layer's `L=` (the length its system is defined for): None or an int >= 1, else a ValueError."""
    if L is not None and (isinstance(L, bool) or not isinstance(L, int) or L < 1):
        raise ValueError(f"L={L!r} must be None or an int >= 1 (the length the system is defined for)")


def check_even_state(d_state, who):
    hippo._check_even("d_state", d_state, who)


class SSMLayer(nn.Module):
    """Input and state checks shared by all layers. Subclasses set d_model and check_finite."""

    def _forward_float32(self, *args, **kwargs):
        """The class's `forward` in float32 with autocast off; `keep_ssm_float32` (diagssm.train.world)
        installs it as the instance's `forward`. A bound method of the class, so that a deepcopy (EMA,
        AveragedModel) runs its own parameters and a pickled layer keeps it."""
        return self._in_float32(type(self).forward, *args, **kwargs)

    def _step_float32(self, *args, **kwargs):
        """`step` as `_forward_float32` runs `forward`."""
        return self._in_float32(type(self).step, *args, **kwargs)

    def _in_float32(self, fn, *args, **kwargs):
        """fn(self, *args, **kwargs) with autocast off, a half-precision input (positional, u= or u_t=)
        cast to the parameters' float32 or float64."""
        u = _input(args, kwargs)
        if torch.is_tensor(u) and u.dtype in (torch.bfloat16, torch.float16):
            dtype = self.param_dtype()
            u = u.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
            if args:
                args = (u,) + args[1:]
            else:
                kwargs = {**kwargs, ("u" if "u" in kwargs else "u_t"): u}
        with chunked_native.no_autocast(u):
            return fn(self, *args, **kwargs)

    def check_input(self, u, name="u"):
        ndim = 3 if name == "u" else 2
        if not torch.is_tensor(u) or u.dim() != ndim or u.shape[-1] != self.d_model:
            want = "(B, L, H)" if ndim == 3 else "(B, H)"
            got = tuple(u.shape) if torch.is_tensor(u) else type(u).__name__
            raise ValueError(f"{name} must be {want} with H = d_model = {self.d_model}; got {got}")
        dtype = self.param_dtype()
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{type(self).__name__} runs in float32 or float64 (its SSM is complex arithmetic, "
                             f"which PyTorch lacks at lower precision); its parameters are {dtype}. "
                             f"Keep the SSM layers in float32: for mixed precision run the model under "
                             f"torch.autocast with diagssm.train.world.keep_ssm_float32(model)")
        if u.dtype != dtype:
            if u.dtype not in (torch.float32, torch.float64):  # layer.to(int64 / bfloat16 / complex64) is no fix
                hint = (" (under torch.autocast keep the SSM layers in float32: diagssm.train.world.keep_ssm_float32)"
                        if u.dtype in (torch.bfloat16, torch.float16) else "")
                raise ValueError(f"{name} has dtype {u.dtype}; the layer takes real float32 or float64 inputs "
                                 f"(its parameters are {dtype}: {name}.to({dtype})){hint}")
            raise ValueError(f"{name} has dtype {u.dtype} but the layer's parameters are {dtype}; "
                             f"convert one of them (layer.to({u.dtype}) or {name}.to({dtype}))")
        if u.device != self.D.device:
            raise ValueError(f"{name} is on {u.device} but the layer's parameters are on {self.D.device}")
        if ndim == 3 and min(u.shape[:2]) < 1:  # (a step of B = 0 inputs returns empty tensors)
            what = "length L" if u.shape[1] < 1 else "batch size B"
            raise ValueError(f"{name} has {what} = 0; need {what[-1]} >= 1")
        if self.check_finite and not torch.isfinite(u).all():
            raise NonFiniteInput(f"{name} contains NaN or infinite values (pass check_finite=False to skip this check)")

    def check_state(self, state, batch_size):
        spec = self.__dict__.get("_state_spec")  # (dtype, device) -> the state's trailing shape and dtype
        if spec is None or spec[0] != (self.D.dtype, self.D.device):
            empty = self.default_state(0)
            spec = self.__dict__["_state_spec"] = ((self.D.dtype, self.D.device), tuple(empty.shape[1:]), empty.dtype)
        shape, dtype = (batch_size,) + spec[1], spec[2]
        if not torch.is_tensor(state) or tuple(state.shape) != shape or state.dtype != dtype:
            got = (tuple(state.shape), state.dtype) if torch.is_tensor(state) else type(state).__name__
            raise ValueError(f"state must have shape {shape} and dtype {dtype}; got {got}")
        if state.device != self.D.device:  # the native kernels would read another device's pointer
            raise ValueError(f"state is on {state.device} but the layer's parameters are on {self.D.device}")

    def check_recurrent(self, L=None, rate=1.0):
        if self.bidirectional:
            raise ValueError("a bidirectional layer has no recurrent state: it sees the future. "
                             "Use return_state/step only with bidirectional=False")
        why = self.recurrent_problem(L, rate) if L is not None else ""
        if why:
            raise ValueError(f"{type(self).__name__}: {why}; step and states need a higher precision "
                             f"(float64) or a shorter L")

    def recurrent_problem(self, L, rate):
        """Why the recurrent form (the chunked path, `step`, states in and out) cannot hold this
        system at length L in this dtype ('' when it can)."""
        return ""

    def pick_backend(self, u, L=None, rate=1.0):
        """"chunked" on the CPU in float32 and float64, "fft" on other devices, unless `self.backend`
        names one; `recurrent_problem` can veto the chunked path. On a GPU (H100, fwd+bwd, B = 16,
        H = 128, N = 64, L = 1024-65536, float32 and float64: docs/benchmarks/backends-gpu-h100.md)
        "fft" was faster at every length and dtype than the chunked op's PyTorch path: by 1.3-3.8x
        with the GPU's larger time blocks (`chunked.BLOCK_NUMBERS_GPU`), 2.1-12x before them (many
        small kernel launches; the native kernels are CPU-only).
        S4D and DSS forward + backward in float32 (docs/benchmarks/layers-cpu-2core.md, the chunked
        op on its native kernels): chunked as fast as "fft" or faster at every length measured,
        1.0x (DSS) to 2.1x (S4D) at L = 1024, 1.7-2.4x at 4096, 2.4-2.7x at 16384, 2.1-2.8x at
        65536, with 23-40% of its memory. By dtype, L = 1024-16384 (benchmarks/bench_backends.py,
        session 8, before the native kernels): chunked faster in 30 of 32 cases over two runs; the
        two exceptions, float64 at L <= 4096, were faster in the other run. S4 (its dense-carry
        chunked path, `ops.chunked_dense`; session 25): chunked faster in all 8 cases of
        bench_backends.py --layers s4 (float32 on its native kernels and float64, L = 1024-16384:
        1.37-4.95x, docs/benchmarks/backends-s4-cpu-2core-session25-native.md) and 1.8-4.2x in
        float32 in `diagssm bench` (s4-cpu-2core-session25-native-run1.md, -run2.md). Not measured
        on a GPU."""
        check_backend(self.backend, type(self).__name__)  # also when set after construction (layer.backend = ...)
        backend = self.backend if self.backend != "auto" else ("chunked" if u.device.type == "cpu" else "fft")
        why = self.recurrent_problem(L, rate) if backend == "chunked" else ""
        if why and self.backend == "chunked":
            raise ValueError(f"{type(self).__name__}: {why}; use backend='fft' or 'auto'")
        backend = "fft" if why else backend
        if backend != getattr(self, "last_backend", None):
            log.info("%s: %s backend on %s%s", type(self).__name__, backend, u.device, f" ({why})" if why else "")
            self.last_backend = backend
        return backend

    def param_dtype(self):
        return self.D.dtype

    def zero_state(self, batch_size, *shape):
        """Zeros (batch_size, *shape) of the state's complex dtype (complex64 for float32 parameters,
        complex128 for float64); batch_size an int >= 0 (numpy's too), else a ValueError."""
        batch_size = int(batch_size) if isinstance(batch_size, np.integer) else batch_size
        hippo._check_int("batch_size", batch_size, 0, type(self).__name__)
        return torch.zeros(batch_size, *shape, dtype=self.param_dtype().to_complex(), device=self.D.device)

    def inference_cached(self, key, build):
        """`build()`, reused under no autograd (inference) until a parameter or buffer changes (tracked
        by their identities, storages and version counters, which in-place updates bump), an
        optimizer takes a step (`_optimizer_steps`: fused optimizers bump no version counter), or
        `key` (the arguments build depends on) or dtype/device do: generation then does not rebuild
        the step's system at every step. With autograd on, built afresh each call; so too for tensors
        made under `torch.inference_mode`, which have no version counter. Changes made through
        `.data` bypass the version counter: call `clear_cache()` after them."""
        if torch.is_grad_enabled():
            return build()
        tensors = [*self.parameters(), *self.buffers()] if self._modules else \
            [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]
        try:
            key = (key, self.D.dtype, self.D.device, _optimizer_steps[0],
                   tuple((id(t), t.data_ptr(), t._version) for t in tensors))
        except RuntimeError:  # "Inference tensors do not track version counter"
            return build()
        if getattr(self, "_step_cache", (None,))[0] != key:
            self._step_cache = (key, build())
        return self._step_cache[1]

    def clear_cache(self):
        """Forget the system `inference_cached` keeps (needed only after changes through `.data`)."""
        self.__dict__.pop("_step_cache", None)

    def __getstate__(self):
        """Pickles and deepcopies leave the inference cache out (it holds views of the parameters)."""
        state = super().__getstate__().copy()
        state.pop("_step_cache", None)
        return state

    def extra_repr(self):
        keys = ("d_model", "d_state", "init", "measure", "rank", "variant", "discretization", "blocks", "channels",
                "bidirectional")
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if hasattr(self, k))


class DiagonalSSM(SSMLayer):
    """H independent diagonal systems of M modes each. Subclasses define `kernel` and `system`."""

    factor = 2
    length_dependent = False  # True when the system depends on the sequence length (DSS-softmax)

    def kernel(self, L, rate):  # (C', H, L)
        raise NotImplementedError

    def system(self, L, rate):  # (w, B_bar, C)
        raise NotImplementedError

    def default_state(self, batch_size):
        """The zero state, (B, H, M) complex."""
        return self.zero_state(batch_size, self.d_model, self.n_modes)

    @chunked_native.eager  # runs as it is inside a compiled model (README, torch.compile)
    @autocast_off
    def forward(self, u, state=None, return_state=False, rate=1.0, L=None):
        """y = K * u + D u (+ the response to `state`), by FFT convolution or chunked matmuls.

        `rate` scales dt (a change of sampling rate at inference); `L` is the length the system
        is defined for, for layers whose system depends on it (DSS-softmax; default: u's length).
        The backend is `self.backend` ("auto" picks by device and length: `pick_backend`); the
        one used is in `self.last_backend`.

        Shapes:
            u: (B, L, H); state: (B, H, M) complex or None (zero)
            returns y (B, L, C'' H) with C'' = channels (H alone when channels = 1),
            and the final state (B, H, M) when return_state
        """
        self.check_input(u)
        Bsz, L_u, H = u.shape
        L = self.system_length(L, L_u)
        check_bools(type(self).__name__, return_state=return_state)
        if state is not None or return_state:
            self.check_recurrent(L, rate)
            state = self.default_state(Bsz) if state is None else state
            self.check_state(state, Bsz)
        backend = self.pick_backend(u, L, rate)
        if backend == "chunked":
            y, x = self._forward_chunked(u, state, rate, L)
        else:
            y, x = self._forward_fft(u, state, return_state, rate, L)
        return (y, x) if return_state else y

    def _forward_chunked(self, u, state, rate, L):
        w, B_bar, C = self.system(L, rate)  # (H, M), (H, M), (C', H, M)
        y, x = diagonal_chunked(u, w, B_bar, C[: self.channels], self.factor, state, D=self.D)  # (B, L, channels, H)
        if self.bidirectional:  # the anti-causal half: the same system run over the reversed input
            y = y + diagonal_chunked(u.flip(1), w, B_bar, C[self.channels:], self.factor)[0].flip(1)
        return y.flatten(2), x  # (B, L, channels H)

    def _forward_fft(self, u, state, return_state, rate, L):
        Bsz, L_u, H = u.shape
        K = self.kernel(L, rate)[..., :L_u]  # (C', H, L_u)
        if self.bidirectional:
            K = K.unflatten(0, (2, -1)).transpose(0, 1)  # (channels, 2, H, L)
        y = [fft_conv(u, K[c], self.D[c], bidirectional=self.bidirectional) for c in range(self.channels)]
        y = torch.cat(y, dim=-1)  # (B, L, channels H)
        if state is None:
            return y, None
        w, B_bar, C = self.system(L, rate)
        z = C * torch.exp(w) * state[:, None]  # (B, C', H, M): the zero-input response
        y = y + self.factor * vandermonde_sum(z, w, L_u).permute(0, 3, 1, 2).flatten(2)  # (B, L, C' H)
        if not return_state:
            return y, None
        x = torch.exp(w * L_u) * state + B_bar * vandermonde_contract(u.transpose(1, 2), w)  # (B, H, M)
        return y, x

    def step_system(self, L, rate):
        """(A_bar, B_bar, C) for `step`, contiguous (`inference_cached`)."""
        def build():
            w, B_bar, C = self.system(L, rate)
            return chunked_native.dense(torch.exp(w), B_bar, C)
        return self.inference_cached((rate, L), build)

    def system_length(self, L, L_u):
        check_length(L)
        if L is None or not self.length_dependent:
            return L_u
        if L < L_u:
            raise ValueError(f"L={L} is shorter than the input's length {L_u}")
        return L

    @chunked_native.eager  # runs as it is inside a compiled model (README, torch.compile)
    @autocast_off
    def step(self, u_t, state, rate=1.0, L=None):
        """One step of the recurrence: x = A_bar x + B_bar u_t, y_t = factor Re(C x) + D u_t.

        Shapes: u_t (B, H); state (B, H, M) complex -> y_t (B, C'' H), state (B, H, M)
        """
        check_length(L)
        self.check_recurrent(L, rate)
        self.check_input(u_t, "u_t")
        self.check_state(state, u_t.shape[0])
        A_bar, B_bar, C = self.step_system(L, rate)
        y, x = diagonal_step(u_t, state, A_bar, B_bar, C, self.D, self.factor)  # (B, C', H), (B, H, M)
        return y.flatten(1), x
