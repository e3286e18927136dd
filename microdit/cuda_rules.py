"""CUDA's autocast dtype rules on a machine without a GPU.

On CUDA, bf16 autocast runs matmuls in bf16 but layer_norm, softmax, pow, sum and the other ops of CUDA's
"fp32" list in fp32; CPU autocast keeps layer_norm and softmax in bf16. Code that is only ever tested
under CPU autocast can therefore mix dtypes in a way that first fails on the GPU. Two emulations:

- `fake_cuda()` + `cuda_autocast()`: the exact rules, for forward passes. Tensors are fake (shapes,
  dtypes and devices only, no memory or numerics; torch._subclasses.FakeTensorMode) on a "cuda" device,
  and CUDA's own autocast kernels decide every dtype (the dispatcher's AutocastCUDA key, turned on without
  the availability check of `torch.autocast("cuda")`). Backward cannot run there without a GPU (the
  autograd engine asks the driver for a CUDA context), so this is the reference the second emulation is
  tested against (tests/test_cuda_rules.py compares the dtype of every module's output).
- `cpu_autocast_like_cuda()`: CPU tensors, real or fake (`fake_tensors("cpu")`), forward and backward.
  CPU autocast casts the matmuls; autocast kernels registered for the CPU (`cuda_rules_on_cpu`) apply
  CUDA's rules where CPU autocast differs (`CUDA_FP32_OPS` run in fp32, `CUDA_LOWER_OPS` in the autocast
  dtype). Real CPU kernels make their own dtype checks; fake kernels skip some, so `fake_tensors` adds
  CUDA's same-dtype checks for the ops in `SAME_DTYPE_OPS`. Used by the bf16 training-step test and the memory
  planner (microdit/memory.py).

    with torch.device("meta"):
        model = create_model("MicroDiT_XL_2")
    with fake_cuda(), cuda_autocast(torch.bfloat16):
        out = to_fake(model, "cuda")(x, t, y)              # CUDA's own dtype choices, forward only
    with cpu_autocast_like_cuda(torch.bfloat16):
        loss = edm_loss(model, x, y, EDMConfig())          # CPU model (real or fake), CUDA's dtypes
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

# Ops of CUDA autocast's fp32 lists (aten/src/ATen/autocast_mode.cpp) that CPU autocast does not run in
# fp32: with a bf16 or fp16 input they run in fp32 (the "sum"-like ones only when no dtype is asked for).
CUDA_FP32_OPS = (
    "layer_norm", "native_layer_norm", "group_norm", "softmax.int", "log_softmax.int", "exp", "expm1", "log",
    "log2", "log10", "log1p", "rsqrt", "reciprocal", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "erfinv", "acos", "asin", "cosh", "sinh", "tan", "logsumexp", "cumsum", "cumprod",
    "sum", "sum.dim_IntList", "linalg_vector_norm", "cosine_similarity",
)
# Ops of CUDA autocast's lower-precision list that CPU autocast does not cast.
CUDA_LOWER_OPS = ("einsum", "mv", "addmv", "addr", "chain_matmul", "linalg_multi_dot")
# Ops whose CUDA kernels refuse inputs of different floating dtypes (fake kernels do not check).
SAME_DTYPE_OPS = {"index_add", "index_add_", "index_copy", "index_copy_", "scatter_add", "scatter_add_"}
_LOW = (torch.bfloat16, torch.float16)


def _cast(args, kwargs, dtype, only_from):
    def f(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype in only_from:
            return t.to(dtype)
        return t
    return tree_map(f, args), tree_map(f, kwargs or {})


def _autocast_kernel(op, lower: bool):
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            if lower:
                args, kwargs = _cast(args, kwargs, torch.get_autocast_dtype("cpu"), (torch.float32,))
            elif kwargs.get("dtype") is None:
                args, kwargs = _cast(args, kwargs, torch.float32, _LOW)
            return op(*args, **kwargs)
    return kernel


_registered: list = []       # [library, depth] while cuda_rules_on_cpu is entered


@contextlib.contextmanager
def cuda_rules_on_cpu():
    """While entered, CPU autocast follows CUDA autocast for the ops where the two differ.

    The rules are autocast kernels (dispatch key AutocastCPU), so they also hold in backward, e.g. when a
    checkpointed block is recomputed under the autocast state saved in forward."""
    if not _registered:
        lib = torch.library.Library("aten", "IMPL")
        for names, lower in ((CUDA_FP32_OPS, False), (CUDA_LOWER_OPS, True)):
            for name in names:
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, _autocast_kernel(op, lower), "AutocastCPU")
        _registered.extend([lib, 0])
    _registered[1] += 1
    try:
        yield
    finally:
        _registered[1] -= 1
        if _registered[1] == 0:
            _registered.pop()
            _registered.pop()._destroy()


@contextlib.contextmanager
def cpu_autocast_like_cuda(dtype: torch.dtype = torch.bfloat16):
    """CPU autocast to `dtype` with CUDA's choices for the ops CPU autocast treats differently."""
    with cuda_rules_on_cpu(), torch.autocast("cpu", dtype=dtype):
        yield


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16):
    """`torch.autocast("cuda", dtype)` without its check for a real GPU (for fake "cuda" tensors)."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


class SameDtypeChecks(TorchDispatchMode):
    """Raise, as the CUDA kernels do, when index_add / index_copy / scatter_add mix floating dtypes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SAME_DTYPE_OPS:
            self_, source = args[0], args[3]            # (self, dim, index, source)
            if isinstance(source, torch.Tensor) and self_.dtype != source.dtype:
                raise RuntimeError(f"{name}(): self ({_short(self_.dtype)}) and source ({_short(source.dtype)}) "
                                   "must have the same scalar type")
        return func(*args, **(kwargs or {}))


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half"}.get(dtype, str(dtype))


@contextlib.contextmanager
def fake_tensors(device: str = "cpu"):
    """Fake tensors (no memory, no numerics) with `device` as the default device, and CUDA's same-dtype checks.

    Forward passes work on a fake "cuda" device (CUDA's own autocast rules apply there), but backward does
    not on a build without a GPU (the autograd engine asks the CUDA driver for its context): training steps
    use device "cpu" with `cpu_autocast_like_cuda`."""
    with FakeTensorMode(allow_non_fake_inputs=False), SameDtypeChecks(), torch.device(device):
        yield


def fake_cuda():
    """Fake tensors on a "cuda" device: pair with `cuda_autocast` for CUDA's own dtype rules (forward only)."""
    return fake_tensors("cuda")


def to_fake(module: torch.nn.Module, device: str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Give a module built on the "meta" device fake parameters and buffers on `device` (inside `fake_tensors`).

    Floating parameters become `dtype` when given (e.g. bf16 compute parameters)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                dt = dtype if dtype is not None and p.is_floating_point() else p.dtype
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt, device=device),
                                                         requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return module
