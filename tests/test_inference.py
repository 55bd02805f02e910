"""The CPU inference copy of the network: folded batch norms, fused activations, same padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simsearch.embedding import prepare_image
from simsearch.model import DEFAULT_MODEL, inference, load_model


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL)


def _photos(n: int, size: int) -> torch.Tensor:
    from badfiles import photo_like

    return torch.stack([prepare_image(photo_like((size, size), seed=i), size) for i in range(n)])


@pytest.mark.parametrize("fuse", [True, False])
def test_cpu_inference_copy_computes_what_the_model_does(default_model, fuse):
    model = default_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = inference.optimize_for_cpu(model, fuse=fuse)
    assert net is not model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # all folded
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, inference.InferenceConv) for m in net.modules()) == convs
    fused = [m.act for m in net.modules() if isinstance(m, inference.InferenceConv)]
    assert fused.count("hardtanh") > 10  # the ReLU6 of every inverted residual block
    assert fused.count("relu") == 2  # the shallow paths' ReLU
    assert isinstance(net.path_p, inference.InferenceShallowPath)
    x = _photos(3, model.config.input_size)
    with torch.inference_mode():
        want, got = model(x), net(x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5)
    after = model.state_dict()  # the model itself is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("hw", [(224, 224), (225, 223), (17, 30)])
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation"), [(3, 2, 1), (5, 2, 1), (3, 1, 1), (3, 2, 2)]
)
def test_same_padding_becomes_a_shifted_kernel(hw, kernel, stride, dilation):
    """timm's Conv2dSame (TF padding, one more on the end) + BatchNormAct, for any input size."""
    from timm.layers import BatchNormAct2d, Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(6, 6, kernel, stride=stride, dilation=dilation, groups=6, bias=False)
    norm = BatchNormAct2d(6, act_layer=torch.nn.ReLU6).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    act, _rest = inference.norm_activation(norm)
    fast = inference.InferenceConv(
        conv, norm, act, (224, 224), inference.fused_convolution_available()
    )
    x = torch.randn(2, 6, *hw) * 3
    with torch.inference_mode():
        np.testing.assert_allclose(fast(x).numpy(), norm(conv(x)).numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (1, 3, 30, 17), (2, 5, 16, 16)])
@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("channels_last", [True, False])
def test_average_pool_is_avg_pool2d(shape, k, channels_last):
    x = torch.randn(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.avg_pool2d(x, k)
    got = inference.average_pool(x, k)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


class _TrickyNet(torch.nn.Module):
    """A convolution's output used twice: by its batch norm and by a shortcut around it."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(input_size=32)
        self.model_id = "tricky"
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4).eval()
        with torch.no_grad():
            self.norm.running_mean.fill_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.float() / 255)
        return torch.nn.functional.normalize((self.norm(y) + y).flatten(1), dim=1)


def test_a_network_the_copy_would_get_wrong_is_used_as_it_is(caplog):
    net = _TrickyNet()
    assert inference.optimize_for_cpu(net) is net
    assert "disagrees" in caplog.text


def test_the_fused_weight_is_reordered_once_and_gives_the_same_sums():
    import copy
    import pickle

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 1)
    fused = inference.fused_convolution_available()
    fast = inference.InferenceConv(conv, None, ("relu", []), (12, 12), fused)
    x = torch.randn(3, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first = fast(x)
        assert (fast._packed is not None) == fused  # made on the first call, where fused
        again = fast(x[:1])  # another batch size: the same reordered weight serves
        want = torch.relu(conv(x))
    np.testing.assert_allclose(first.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(again.numpy(), first[:1].numpy(), atol=1e-6)
    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert copied._packed is None  # an opaque oneDNN tensor is not copied; remade on use
        with torch.inference_mode():
            assert torch.equal(copied(x), first)
