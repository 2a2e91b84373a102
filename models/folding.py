"""Fold a trained network for inference: no BatchNorm, LastBN or ScaledConv2d left.

`fold(model)` returns an eval-mode copy with the same eval-mode outputs, built from plain layers
only, so that it exports (torch.export, TorchScript, ONNX) and runs as a plain conv network:

* each `ScaledConv2d` becomes a Conv2d with weight and bias multiplied by its scalar;
* each BatchNorm2d (BN twins) is folded into the Conv2d that feeds it;
* each `LastBN` is folded into the layer that computed the logits: the last Linear or Conv2d
  before it, reached through ops that commute with a per-channel affine map (flatten from dim 1,
  adaptive average pooling, dropout, identity), as in every registry model.

The modules are replaced in place of the copy (BatchNorms and LastBNs by `nn.Identity`), so the
copy keeps the original classes and forward.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .conversion import (
    OTHER_NORMS,
    check_unwrapped,
    conv_bn_pairs,
    conv_like,
    fused_with_bn,
    logits_layer,
    module_calls,
    replace_module_,
    trace,
)
from .mimicnorm import LastBN, ScaledConv2d, _scale_conv_params


def fold(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with identical eval outputs and no normalisation or scalars.

    `model` is left untouched. Raises ValueError, naming the layer, for a normalisation layer it
    cannot fold (not fed by a conv, or by a layer it cannot fold into), or for a wrapped network
    (DataParallel, torch.compile); TypeError for what is not an nn.Module.
    """
    check_unwrapped(model, "fold(model)")
    net = copy.deepcopy(model).eval()
    for name, module in list(net.named_modules()):
        if isinstance(module, ScaledConv2d):
            replace_module_(net, name, _unscaled(module))
    graph = trace(net)
    for conv_name, bn_name in conv_bn_pairs(net, graph).items():
        _fold_into_(net.get_submodule(conv_name), net.get_submodule(bn_name), bn_name)
        replace_module_(net, bn_name, nn.Identity())
    calls = module_calls(graph)
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(net.get_submodule(node.target), LastBN):
            layer = net.get_submodule(_logits_layer(net, node, calls))
            _fold_into_(layer, net.get_submodule(node.target).bn, node.target)
            replace_module_(net, node.target, nn.Identity())
    _check_folded(net)
    return net


def _unscaled(conv: ScaledConv2d) -> nn.Conv2d:
    """The plain Conv2d computing what `conv` computes: weight and bias times its scalar."""
    plain = conv_like(conv, conv.bias is not None)
    weight, bias = _scale_conv_params(conv.weight, conv.bias, conv.scale, conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain


def _fold_into_(layer: nn.Module, bn: nn.BatchNorm1d | nn.BatchNorm2d, bn_name: str) -> None:
    """Make the Linear or Conv2d `layer` compute itself followed by `bn` in eval mode."""
    layer.weight, layer.bias = fused_with_bn(layer.weight, layer.bias, bn, bn_name)


def _logits_layer(model: nn.Module, last_bn: fx.Node, calls: dict[str, list[fx.Node]]) -> str:
    """The Linear or Conv2d (called once) whose output alone reaches `last_bn` via pass-throughs."""
    name, stop = logits_layer(model, last_bn.args[0], calls)
    if name is None:
        raise ValueError(
            f"cannot fold LastBN {last_bn.target!r}: its input ({stop}) does not come from a "
            "Linear or Conv2d through flatten, adaptive average pooling, dropout or identity alone"
        )
    return name


def _check_folded(model: nn.Module) -> None:
    """Raise ValueError naming any normalisation or scalar layer left in `model`."""
    leftover = (nn.BatchNorm2d, LastBN, ScaledConv2d) + OTHER_NORMS
    for name, module in model.named_modules():
        if isinstance(module, leftover):
            raise ValueError(f"fold cannot fold {name!r} ({type(module).__name__})")
