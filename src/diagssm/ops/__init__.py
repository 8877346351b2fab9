"""Pure functions of the diagonal SSMs. Each fast op has a `*_ref` twin (loops or dense matrices)."""
from diagssm.ops.discretize import discretize, discretize_ref
from diagssm.ops.kernels import dss_kernel, dss_kernel_ref, s4d_kernel, s4d_kernel_ref
from diagssm.ops.scan import scan, scan_ref
from diagssm.ops.conv import fft_conv, fft_conv_ref, modal_conv
from diagssm.ops.cauchy import cauchy, cauchy_ref
from diagssm.ops.chunked import diagonal_chunked, diagonal_chunked_ref
from diagssm.ops.chunked_dense import dense_chunked, dense_chunked_ref
from diagssm.ops.s5_native import s5_fused, s5_fused_ref, s5_step, s5_step_ref
from diagssm.ops.step import diagonal_step, diagonal_step_ref, dplr_step, dplr_step_ref

__all__ = [
    "discretize", "discretize_ref", "s4d_kernel", "s4d_kernel_ref", "dss_kernel", "dss_kernel_ref",
    "scan", "scan_ref", "fft_conv", "fft_conv_ref", "modal_conv", "cauchy", "cauchy_ref",
    "diagonal_chunked", "diagonal_chunked_ref", "dense_chunked", "dense_chunked_ref", "s5_fused", "s5_fused_ref",
    "diagonal_step", "diagonal_step_ref", "s5_step", "s5_step_ref", "dplr_step", "dplr_step_ref",
]
