"""The Deep Ranking network in an inference form for CPUs: batch norms folded, activations fused.

`optimize_for_cpu` copies a model, folds every eval-mode batch norm into the convolution before it,
fuses the activation that follows (oneDNN's fused convolution where it runs and agrees), turns
TF-style 'same' padding into symmetric padding with a shifted kernel, and checks the copy against
the model on a test image before it is used. Embedding (`simsearch.embedding`) runs this copy.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simsearch.model.network import EmbeddingModel, ShallowPath

log = logging.getLogger(__name__)


class InferenceConv(nn.Module):
    """A convolution with its batch norm folded in and its activation fused.

    TF-style 'same' padding (timm's Conv2dSame pads one side more) becomes symmetric padding
    with the kernel shifted by zero taps, for the input size seen when it was made: the same
    sums without padding a copy of every activation. The fused path keeps the weight in oneDNN's
    own layout, made on the first call (`_packed_weight`), instead of reordering it on every call.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        norm: nn.Module | None,
        act: tuple[str, list[float]],
        input_hw: tuple[int, int],
        fused: bool,
    ) -> None:
        super().__init__()
        weight, bias = _fold(conv, norm)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.act, self.act_args = act
        self.fused = fused
        self.same_pads: list[int] | None = None  # (left, right, top, bottom) for other sizes
        self.input_hw = input_hw
        self.register_buffer("plain_weight", weight)
        self.padding = list(conv.padding)
        if _is_conv2d_same(conv):
            self.same_pads = _same_pads(input_hw, weight.shape[-2:], self.stride, self.dilation)
            if self.dilation == [1, 1]:
                weight, self.padding = _shift_for_same(weight, self.same_pads)
            else:  # a shifted dilated kernel would skip the wrong taps: pad every call
                self.input_hw = (-1, -1)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self._packed: torch.Tensor | None = None  # not a buffer: rebuilt where it runs

    def cast(self, dtype: torch.dtype) -> None:
        """Weights in the compute dtype; the bias stays float32 (oneDNN adds it in fp32)."""
        self.weight = self.weight.to(dtype)
        self.plain_weight = self.plain_weight.to(dtype)
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = self.weight, self.padding
        if self.same_pads is not None and tuple(x.shape[-2:]) != self.input_hw:
            hw = tuple(x.shape[-2:])
            weight, padding = self.plain_weight, [0, 0]
            x = F.pad(x, _same_pads(hw, weight.shape[-2:], self.stride, self.dilation))
        elif self.fused:
            weight = self._packed_weight(x)
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise(
                x.to(weight.dtype), weight, self.bias, padding, self.stride, self.dilation,
                self.groups, self.act, self.act_args, "",
            )  # fmt: skip
        y = F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return _activate(y, self.act, self.act_args)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight reordered once into oneDNN's layout for x's shape (the same sums; 3% faster
        per image in batches of 8, 16% for one image); the plain weight where that fails."""
        packed = self._packed
        if packed is None:
            packed = self.weight
            try:
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight, self.padding, self.stride, self.dilation, self.groups,
                    list(x.shape),
                )  # fmt: skip
            except Exception:  # a private op: missing or refused in this build means "plain"
                log.debug("oneDNN weight reordering unavailable", exc_info=True)
            self._packed = packed
        return packed

    def __getstate__(self) -> dict[str, object]:
        """Without the reordered weight, an opaque oneDNN tensor that cannot be copied."""
        return {**self.__dict__, "_packed": None}


class InferenceShallowPath(nn.Module):
    """A Deep Ranking shallow path (ShallowPath) with its ReLU fused and a faster pooling."""

    def __init__(self, path: ShallowPath) -> None:
        super().__init__()
        self.subsample = path.subsample
        self.conv = path.conv
        self.conv.act, self.conv.act_args = "relu", []
        self.pool = path.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.pool(self.conv(average_pool(x, self.subsample)))
        return F.normalize(grid.flatten(1).float(), dim=1)


def average_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """F.avg_pool2d(x, k), as sums over rows then columns where x is channels_last.

    PyTorch pools a 3-channel channels_last image one channel at a time; summing whole rows of
    pixels is about three times faster, and the same up to float rounding.
    """
    n, c, h, w = x.shape
    if k == 1 or h % k or w % k or not x.is_contiguous(memory_format=torch.channels_last):
        return F.avg_pool2d(x, k)
    rows = x.permute(0, 2, 3, 1).reshape(n, h // k, k, w * c).sum(2)
    pooled = rows.reshape(n, h // k, w // k, k, c).sum(3) / (k * k)
    return pooled.permute(0, 3, 1, 2)


def _activate(x: torch.Tensor, act: str, args: list[float]) -> torch.Tensor:
    if act == "relu":
        return F.relu_(x)
    if act == "hardtanh":
        return F.hardtanh_(x, args[0], args[1])
    return x


def _fold(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight and bias with the eval-mode batch norm after it folded in."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else None
    if norm is None:
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        return weight.float(), bias.float()
    mean, var = norm.running_mean.double(), norm.running_var.double()
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    if bias is not None:
        shift = shift + bias * scale
    return (weight * scale.view(-1, 1, 1, 1)).float(), shift.float()


def _is_conv2d_same(conv: nn.Module) -> bool:
    return type(conv).__name__.startswith("Conv2dSame")  # timm's Conv2dSame(Export)


def _same_pads(
    hw: tuple[int, ...], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> list[int]:
    """TF 'same' padding as F.pad takes it: (left, right, top, bottom)."""
    pads = []
    for n, k, s, d in zip(hw, kernel, stride, dilation, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return [left, right, top, bottom]


def _shift_for_same(weight: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Padding (lo, hi) as symmetric hi with hi - lo zero taps in front: the very same sums."""
    left, right, top, bottom = pads
    extra_h, extra_w = bottom - top, right - left
    if extra_h < 0 or extra_w < 0:  # never for TF padding, which puts the extra on the end
        raise ValueError(f"unexpected same padding {pads}")
    weight = F.pad(weight, (extra_w, 0, extra_h, 0))
    return weight, [bottom, right]


_ACTIVATIONS: dict[type, Callable[[nn.Module], tuple[str, list[float]]]] = {
    nn.Identity: lambda m: ("none", []),
    nn.ReLU: lambda m: ("relu", []),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0]),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)]),
}


@functools.cache
def fused_convolution_available() -> bool:
    """Whether oneDNN's fused convolution + activation runs and agrees with conv then clamp."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(8, 1, 3, 3, generator=gen), torch.randn(8, generator=gen)
        with torch.inference_mode():
            got = op(x, w, b, [1, 1], [2, 2], [1, 1], 8, "hardtanh", [0.0, 6.0], "")
            want = F.conv2d(x, w, b, 2, 1, 1, 8).clamp(0, 6)
        return bool(torch.allclose(got, want, atol=1e-4))
    except Exception:  # a private op: missing or broken in this build means "no"
        log.debug("fused oneDNN convolution unavailable", exc_info=True)
        return False


def optimize_for_cpu(
    model: EmbeddingModel, dtype: torch.dtype = torch.float32, *, fuse: bool | None = None
) -> nn.Module:
    """An inference copy for CPUs: batch norms folded, activations fused, weights in `dtype`.

    The copy is checked against the model in float32 on a test batch, and the model itself is
    returned if they disagree, so an unforeseen architecture only loses speed. It runs a few
    tiny forward passes: callers run it on one torch thread, as more would only wait.
    """
    if fuse is None:
        fuse = fused_convolution_available()
    size = model.config.input_size
    net = copy.deepcopy(model).eval().float()
    convs, norms = _trace_convolutions(net, size)
    parents = {id(c): (p, n) for p in net.modules() for n, c in p.named_children()}
    for conv, hw in convs.items():
        norm = norms.get(conv)
        act, rest = ("none", []), None
        if norm is not None:
            act, rest = norm_activation(norm)
        parent, name = parents[id(conv)]
        setattr(parent, name, InferenceConv(conv, norm, act, hw, fuse))
        if norm is not None:
            parent, name = parents[id(norm)]
            setattr(parent, name, rest if rest is not None else nn.Identity())
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ShallowPath) and isinstance(child.conv, InferenceConv):
                setattr(parent, name, InferenceShallowPath(child))
    if not _agrees(net, model, size):
        log.warning("the optimised network disagrees with %s; using it as it is", model.model_id)
        return model
    for module in net.modules():
        if isinstance(module, InferenceConv):
            module.cast(dtype)
    log.debug("optimised %d convolutions (%d batch norms folded)", len(convs), len(norms))
    return net.to(memory_format=torch.channels_last)


def _trace_convolutions(
    net: nn.Module, size: int
) -> tuple[dict[nn.Conv2d, tuple[int, int]], dict[nn.Conv2d, nn.Module]]:
    """The convolutions called once, with their input sizes, and the batch norms they feed."""
    calls: dict[nn.Conv2d, list[tuple[int, int]]] = {}
    outputs: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the tensors are kept alive
    norms: dict[nn.Conv2d, list[nn.Module]] = {}
    norm_calls: dict[nn.Module, int] = {}

    def on_conv(module, inputs, output) -> None:
        calls.setdefault(module, []).append(tuple(inputs[0].shape[-2:]))
        outputs[id(output)] = (output, module)

    def on_norm(module, inputs) -> None:
        norm_calls[module] = norm_calls.get(module, 0) + 1
        hit = outputs.get(id(inputs[0]))
        if hit is not None and hit[0] is inputs[0]:
            norms.setdefault(hit[1], []).append(module)

    hooks = []
    for module in net.modules():
        if type(module) is nn.Conv2d or _is_conv2d_same(module):
            if module.padding_mode == "zeros" and not isinstance(module.padding, str):
                hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_mean is not None and module.running_var is not None:
                hooks.append(module.register_forward_pre_hook(on_norm))
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    finally:
        for hook in hooks:
            hook.remove()
    convs = {conv: hws[0] for conv, hws in calls.items() if len(hws) == 1}
    folded = {
        conv: found[0]
        for conv, found in norms.items()
        if conv in convs and len(found) == 1 and norm_calls[found[0]] == 1
    }
    return convs, folded


def norm_activation(norm: nn.Module) -> tuple[tuple[str, list[float]], nn.Module | None]:
    """The activation a norm layer applies itself (timm's BatchNormAct2d), fused if possible.

    Returns the activation to fuse and the module that replaces the norm (None: nothing).
    """
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    if act is None:
        return ("none", []), None
    fusable = _ACTIVATIONS.get(type(act))
    if fusable is not None:
        return fusable(act), drop  # dropout and drop-block are identities in eval mode
    return ("none", []), nn.Sequential(*(m for m in (drop, act) if m is not None))


def _agrees(net: nn.Module, model: nn.Module, size: int) -> bool:
    """Whether both give the same unit vector for a noise image (folding errors show at once)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        want, got = model(x), net(x.contiguous(memory_format=torch.channels_last))
    if got.shape != want.shape:
        return False
    return bool((got * want).sum(dim=1).min() > 0.9999)
