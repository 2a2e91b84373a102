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
import torch.nn.functional as F
from torch import fx, nn

from .conversion import (
    OTHER_NORMS,
    conv_bn_pairs,
    conv_like,
    fused_with_bn,
    module_calls,
    replace_module_,
    trace,
)
from .mimicnorm import LastBN, ScaledConv2d, _scale_conv_params

# Modules and functions between the logits layer and the LastBN that commute with its affine map.
_PASS_MODULES = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d}


def fold(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with identical eval outputs and no normalisation or scalars.

    `model` is left untouched. Raises ValueError, naming the layer, for a normalisation layer it
    cannot fold (not fed by a conv, or by a layer it cannot fold into).
    """
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
    node = last_bn.args[0]
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if type(module) in (nn.Linear, nn.Conv2d) and len(calls[node.target]) == 1:
                return node.target
            if not isinstance(module, _PASS_MODULES) or _flattens_channels(module):
                break
        elif not _passes_through(node):
            break
        node = node.args[0]
    raise ValueError(
        f"cannot fold LastBN {last_bn.target!r}: its input ({node}) does not come from a Linear "
        "or Conv2d through flatten, adaptive average pooling, dropout or identity alone"
    )


def _passes_through(node: fx.Node) -> bool:
    """True for a call that commutes with a per-channel affine map of its first argument."""
    if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
        return node.target is not torch.flatten or _start_dim(node) == 1
    return node.op == "call_method" and node.target == "flatten" and _start_dim(node) == 1


def _start_dim(node: fx.Node) -> int:
    return node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)


def _flattens_channels(module: nn.Module) -> bool:
    """True for an nn.Flatten that does not start at dim 1 (it would mix channels and batch)."""
    return isinstance(module, nn.Flatten) and module.start_dim != 1


def _check_folded(model: nn.Module) -> None:
    """Raise ValueError naming any normalisation or scalar layer left in `model`."""
    leftover = (nn.BatchNorm2d, LastBN, ScaledConv2d) + OTHER_NORMS
    for name, module in model.named_modules():
        if isinstance(module, leftover):
            raise ValueError(f"fold cannot fold {name!r} ({type(module).__name__})")
