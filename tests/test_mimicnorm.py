"""ScaledConv2d against its reference formulation `scale * conv(x)`, and weight-mean basics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.mimicnorm import CIFAR_RULE, LastBN, ScaledConv2d, WeightMean, centre_filters_

# (in, out, kernel, stride, padding, groups, bias)
CONV_CASES = [
    (4, 6, 3, 1, 1, 1, True),
    (4, 6, 3, 2, 1, 2, True),
    (6, 6, 3, 1, 1, 6, False),
    (5, 7, 1, 1, 0, 1, False),
]


def reference_forward(conv: ScaledConv2d, x: torch.Tensor) -> torch.Tensor:
    """The unfolded formulation: an ordinary conv, then a separate multiply by the scalar."""
    return conv.scale * conv._conv_forward(x, conv.weight, conv.bias)


def make_conv(case: tuple, dtype: torch.dtype = torch.float32) -> ScaledConv2d:
    cin, cout, k, stride, padding, groups, bias = case
    torch.manual_seed(0)
    conv = ScaledConv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias,
                        scale_init=0.7)
    if bias:
        nn.init.normal_(conv.bias)
    return conv.to(dtype)


def grads(conv: nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output, and gradients of a fixed random projection of it w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    out = forward(conv, x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * probe).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in conv.parameters()]


@pytest.mark.parametrize("case", CONV_CASES)
def test_scaled_conv_matches_reference_fp32(case: tuple) -> None:
    conv = make_conv(case)
    x = torch.randn(3, case[0], 9, 9)
    out, g = grads(conv, x, lambda m, t: m(t))
    ref_out, ref_g = grads(copy.deepcopy(conv), x, reference_forward)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CONV_CASES[:2])
def test_scaled_conv_matches_reference_bf16_autocast(case: tuple) -> None:
    conv = make_conv(case).to(memory_format=torch.channels_last)
    x = torch.randn(3, case[0], 9, 9).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, g = grads(conv, x, lambda m, t: m(t))
        ref_out, ref_g = grads(copy.deepcopy(conv), x, reference_forward)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, ref_g):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


@pytest.mark.parametrize("case", CONV_CASES[1:3])
def test_scaled_conv_gradcheck_float64(case: tuple) -> None:
    conv = make_conv(case, torch.float64)
    x = torch.randn(2, case[0], 5, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(conv.parameters())

    def fn(x, *p):
        names = [n for n, _ in conv.named_parameters()]
        return torch.func.functional_call(conv, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


def test_scaled_conv_saves_only_its_input_and_parameters() -> None:
    conv = make_conv(CONV_CASES[0])
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x)
    params = {p.untyped_storage().data_ptr() for p in conv.parameters()}
    activations = {t.untyped_storage().data_ptr() for t in saved} - params
    assert activations == {x.untyped_storage().data_ptr()}


def test_scaled_conv_padding_modes_and_frozen_parameters() -> None:
    torch.manual_seed(0)
    conv = ScaledConv2d(3, 4, 3, padding="same", padding_mode="reflect", scale_init=1.5)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), reference_forward(conv, x))
    conv.weight.requires_grad_(False)
    conv(x).sum().backward()
    assert conv.weight.grad is None and conv.scale.grad is not None and conv.bias.grad is not None


def test_scaled_conv_compiles() -> None:
    conv = make_conv(CONV_CASES[1])
    x = torch.randn(2, 4, 8, 8)
    out, g = grads(conv, x, lambda m, t: m(t))
    compiled = torch.compile(copy.deepcopy(conv), backend="aot_eager", fullgraph=True)
    c_out, c_g = grads(compiled, x, lambda m, t: m(t))
    torch.testing.assert_close(c_out, out)
    for a, b in zip(c_g, g):
        torch.testing.assert_close(a, b)


def test_centre_filters_zero_mean_per_filter_and_leaves_others() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Linear(4, 4)
    )
    untouched = [copy.deepcopy(m.weight) for m in (model[0], model[2], model[3])]
    projection = WeightMean(model, CIFAR_RULE)
    assert len(projection) == 1
    projection()
    assert model[1].weight.mean(dim=(1, 2, 3)).abs().max() < 1e-6
    for w, m in zip(untouched, (model[0], model[2], model[3])):
        assert torch.equal(w, m.weight)


def test_centre_filters_matches_direct_subtraction() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(4, 3, 3, 3), torch.randn(5, 2, 1, 1), torch.randn(4, 3, 3, 3)]
    expected = [w - w.mean(dim=(1, 2, 3), keepdim=True) for w in weights]
    centre_filters_(weights)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w, e)


def test_last_bn_keeps_float64_and_lifts_lower_precisions_to_float32() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64) * 3 + 1
    last_bn = LastBN(5).double()
    out = last_bn(logits)
    assert out.dtype == torch.float64
    expected = (logits - logits.mean(0)) / torch.sqrt(logits.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for dtype in (torch.bfloat16, torch.float16):
        assert LastBN(5)(logits.to(dtype)).dtype == torch.float32
