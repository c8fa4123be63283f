"""Kernel tests run the Triton kernels on CUDA when a GPU is present, else in the Triton interpreter on CPU.

Triton decides between compiling and interpreting when a kernel is *decorated* (it reads TRITON_INTERPRET
then, via triton.knobs), i.e. when moelab.kernels.triton_moe is first imported; so the variable is set here,
before any test module imports it. An explicit TRITON_INTERPRET in the environment is left alone.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
