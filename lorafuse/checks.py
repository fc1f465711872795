"""Input validation shared by every backend, so a bad call fails the same way on any device."""

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in for inputs of `dtype` (accumulated gradients, DoRA's norms and column scale):
    fp64 for fp64 inputs, which gradcheck needs at full precision, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_number(name: str, value) -> float:
    """A finite real > 0 (lora_alpha: zero or a negative value would silence or flip the adapter)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_rank(r) -> None:
    check_positive_int("r", r)


def check_dropout(dropout_p, name: str = "lora_dropout") -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


def seed_tensor(seed, device) -> torch.Tensor:
    """`seed` (an int, or a one-element int64 tensor) as the one-element int64 tensor on `device` that the
    launchers take: the kernels load it, so a seed drawn on the GPU needs no host sync."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed must be a one-element int64 tensor, got shape {tuple(seed.shape)} {seed.dtype}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element int64 tensor, got {type(seed).__name__} {seed!r}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in int64, got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_adapter_dtype(x_dtype: torch.dtype, adapter_dtype: torch.dtype, *, name: str, base: str = "x") -> None:
    """Adapters take x's dtype, or float32 on a float16/bfloat16 model (PEFT's default: Adam steps on
    half-precision adapters lose most of their low bits). `base` names what x_dtype belongs to."""
    if adapter_dtype == x_dtype or (adapter_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)):
        return
    allowed = f"{x_dtype}" + (" or torch.float32" if x_dtype in (torch.float16, torch.bfloat16) else "")
    raise TypeError(f"{name} has dtype {adapter_dtype} but {base} has dtype {x_dtype}; adapters must be {allowed}")


def _operands(x, weight, bias, lora_A, lora_B) -> dict:
    """The operands of one LoRA linear call by name (bias left out when None), each checked to be a tensor."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    return named


def _check_one_device(named: dict) -> None:
    x = named["x"]
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; they must be on one device")


def check_same_device(x, weight, bias, lora_A, lora_B) -> None:
    """Every operand (bias may be None) is a tensor on x's device; the messages are check_lora_inputs'."""
    _check_one_device(_operands(x, weight, bias, lora_A, lora_B))


#: Spellings `adapter_dtype` accepts: "auto" (PEFT's default), "base", or a dtype name.
ADAPTER_DTYPE_CHOICES = ("auto", "base", "float32", "float16", "bfloat16", "float64")


def resolve_adapter_dtype(adapter_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of lora_A / lora_B on a base weight of `weight_dtype`.

    "auto": float32 on a float16/bfloat16 base, else the base's dtype (PEFT's autocast_adapter_dtype=True:
    Adam steps on half-precision adapters lose most of their low bits). "base": the base's dtype. A dtype (or
    its name) must be the base's, or float32 on a half-precision base.
    """
    if adapter_dtype == "auto":
        return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
    if adapter_dtype == "base":
        return weight_dtype
    dtype = getattr(torch, adapter_dtype, None) if isinstance(adapter_dtype, str) else adapter_dtype
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise ValueError(f"adapter_dtype must be one of {', '.join(map(repr, ADAPTER_DTYPE_CHOICES))} or a float "
                         f"torch.dtype, got {adapter_dtype!r}")
    check_adapter_dtype(weight_dtype, dtype, name="adapter_dtype", base="the base weight")
    return dtype


def check_lora_inputs(x, weight, bias, lora_A, lora_B) -> None:
    """Check shapes, dtypes and devices of one LoRA linear call.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    lora_A: (r, in_features); lora_B: (out_features, r). weight and bias have x's dtype; lora_A and lora_B
    share one dtype, x's or float32 (on a float16/bfloat16 x).
    """
    named = _operands(x, weight, bias, lora_A, lora_B)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    for name, tensor in named.items():
        if name in ("lora_A", "lora_B"):
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but x has dtype {x.dtype}; they must match")
    check_adapter_dtype(x.dtype, lora_A.dtype, name="lora_A")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B has dtype {lora_B.dtype} but lora_A has dtype {lora_A.dtype}; they must match")
    _check_one_device(named)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim (shape {tuple(x.shape)}) "
                         f"but the layer's in_features is {in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (r, {in_features}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A has rank 0; r must be positive")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must have shape ({out_features}, {r}), got {tuple(lora_B.shape)}")
