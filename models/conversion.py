"""Convert an ordinary BatchNorm2d network into its MimicNorm twin.

`convert(model, num_classes)` does to any torch.fx-traceable conv-BN network what our `_cbn`
builders do to theirs (see models/resnet.py):

* every BatchNorm2d becomes `nn.Identity` and the Conv2d that feeds it (found in the traced graph,
  wherever the two sit) gets a bias;
* the recognised residual blocks get their scalars: the branch's last conv becomes a `ScaledConv2d`
  initialised to 1.2**k / l (k convs in the branch, l the block's index from 1 over the network);
  projection shortcuts follow the reference code of `family` (`PROJECTIONS`);
* a fresh network gets the `_cbn` ResNets' init (convs N(0, 2/fan_in), Linears N(0, 2/in),
  biases 0); with `init=False` the weights are kept and each BatchNorm's eval-mode affine map is
  folded into its conv (and divided by the conv's scalar), so the body computes what the BN
  network computed in eval mode; every such conv then has a bias, for the BatchNorm's shift (a
  CIFAR bottleneck's projection too, bias-free in the `_cbn` nets);
* a `LastBN(num_classes)` follows the network's output: the result is
  `nn.Sequential(body=<converted model>, last_bn=LastBN(num_classes))`, on the network's device
  and in its dtype.

What is kept stays as it was: each new conv's parameters are trainable where those they replace
were (a frozen layer stays frozen), each new module has the train/eval mode of the one it
replaces and the result that of `model`; the convs of a reduced-width registry model keep the
full-width fan-in weight mean judges them by (`record_reference_convs_`).

Recognised residual blocks: our `models.resnet` blocks, torchvision's `BasicBlock` and
`Bottleneck`, and timm's ResNet `BasicBlock` and `Bottleneck` without an attention module (when
timm is installed). Any other module whose own forward adds two tensors (found in the graph: an
add node and the module that executed it) is named in a warning and gets no scalar: e.g.
torchvision's MobileNetV2 `InvertedResidual` or a root module with bypass adds (our SqueezeNet).
Residual paths made otherwise (concatenation, as in ShuffleNet units; a product) are not detected.
"""
from __future__ import annotations

import copy
import functools
import operator
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ._registry import FAMILIES
from .layers import HE_NUMERATOR, fan_in_init_
from .mimicnorm import (CENTRING_GAIN, LastBN, ScaledConv2d, check_module, check_num_classes,
                        is_mimicnorm, residual_scale_init)
from .resnet import ResidualBlock

# Normalisation layers that MimicNorm has no rule for (BatchNorm2d itself is what it replaces).
OTHER_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm,
)
PROJECTIONS = {
    "imagenet": "biased 1x1 conv with a learnable scalar initialised to 1.2",
    "cifar": "no scalar; biased in two-conv (basic) blocks, bias-free in bottlenecks",
}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
# Modules and functions between the logits layer and the output that commute with a per-channel
# affine map (what a LastBN computes in eval mode).
_PASS_MODULES = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d}
# Copied from a conv to its replacement: the full-width shape weight mean judges a conv by.
_REFERENCE_ATTRIBUTES = ("reference_fan_in", "reference_groups")


@dataclass(frozen=True)
class ConvPlan:
    """What a converted conv becomes: a bias or not, a `ScaledConv2d` with `scale` or a Conv2d."""

    bias: bool = True
    scale: float | None = None


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps MimicNorm's own layers as leaves, and adaptive pools (VGG's
    `AvgPoolTo` looks at its input's size)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = (ScaledConv2d, LastBN, nn.AdaptiveAvgPool2d)
        return isinstance(m, leaves) or super().is_leaf_module(m, module_qualified_name)


def convert(
    model: nn.Module, num_classes: int, *, family: str = "imagenet", init: bool = True
) -> nn.Sequential:
    """The MimicNorm twin of `model`, a network built with Conv2d-BatchNorm2d pairs.

    `family` chooses whose reference code the projection shortcuts follow (`PROJECTIONS`);
    `init=False` keeps the weights (BatchNorms folded into their convs) instead of the fresh
    MimicNorm init. `model` is left untouched. Raises ValueError, naming the module, for what
    cannot be converted: no BatchNorm2d, another normalisation layer, a BatchNorm2d not fed by a
    Conv2d of its own, an untraceable forward, a network that is MimicNorm already, a wrapped
    network (DataParallel, torch.compile), `num_classes` other than the network's outputs (when
    its last Linear or Conv2d tells them); TypeError for arguments of the wrong type.
    """
    check_unwrapped(model, "convert(model, num_classes)")
    check_num_classes(num_classes)
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    _check_convertible(model)
    body = copy.deepcopy(model)
    graph = trace(body)
    pairs = conv_bn_pairs(body, graph)
    plans = residual_plans(body, family)
    unplanned = sorted(set(plans) - set(pairs))
    if unplanned:
        raise ValueError(f"residual-branch convs not followed by a BatchNorm2d: {unplanned}")
    _check_outputs(body, graph, num_classes)
    _warn_unrecognised(graph, {name for name, m in body.named_modules() if _residual_parts(m)})
    for conv_name, bn_name in pairs.items():
        conv, bn = body.get_submodule(conv_name), body.get_submodule(bn_name)
        plan = plans.get(conv_name, ConvPlan())
        new = conv_like(conv, plan.bias or not init, plan.scale).train(conv.training)
        _keep_trainable_(new, conv, bn)
        if not init:
            _load_folded_(new, conv, bn, bn_name)
        replace_module_(body, conv_name, new)
        replace_module_(body, bn_name, nn.Identity().train(bn.training))
    if init:
        fan_in_init_(body, HE_NUMERATOR)
    last_bn = LastBN(num_classes).to(*_device_and_dtype(model)).train(model.training)
    result = nn.Sequential(OrderedDict(body=body, last_bn=last_bn))
    result.training = model.training  # not .train(): the body keeps its modules' modes
    return result


def trace(model: nn.Module) -> fx.Graph:
    """`model`'s torch.fx graph (ScaledConv2d, LastBN as leaves); ValueError if untraceable."""
    try:
        return _Tracer().trace(model)
    except Exception as error:  # tracing fails with many exception types
        raise ValueError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(error).__name__}: "
            f"{error}); converting and folding read the network's graph"
        ) from error


def conv_bn_pairs(model: nn.Module, graph: fx.Graph) -> dict[str, str]:
    """`{conv name: BatchNorm2d name}`: every BatchNorm2d with the Conv2d that alone feeds it.

    Raises ValueError for a BatchNorm2d that is not called exactly once on the output of a plain
    Conv2d used nowhere else.
    """
    calls = module_calls(graph)
    pairs = {}
    for name, module in model.named_modules():
        if type(module) is not nn.BatchNorm2d:
            continue
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            raise ValueError(f"BatchNorm2d {name!r} is called {len(nodes)} times by forward")
        source = nodes[0].args[0]
        conv_name = _feeding_conv(model, source, calls)
        if conv_name is None:
            raise ValueError(
                f"BatchNorm2d {name!r} is not fed by a Conv2d of its own "
                f"(its input: {_describe(model, source)})"
            )
        pairs[conv_name] = name
    return pairs


def residual_plans(model: nn.Module, family: str) -> dict[str, ConvPlan]:
    """The convs of the recognised residual blocks that differ from a plain biased Conv2d."""
    names = {id(m): name for name, m in model.named_modules()}
    blocks = [parts for m in model.modules() if (parts := _residual_parts(m)) is not None]
    plans = {}
    for index, (branch, shortcut) in enumerate(blocks, start=1):
        plans[names[id(branch[-1])]] = ConvPlan(scale=residual_scale_init(index, len(branch)))
        projection = [] if shortcut is None else [
            m for m in shortcut.modules() if isinstance(m, nn.Conv2d)
        ]
        if len(projection) == 1:
            plans[names[id(projection[0])]] = _projection_plan(family, len(branch))
    return plans


def conv_like(conv: nn.Conv2d, bias: bool, scale: float | None = None) -> nn.Conv2d:
    """An uninitialised Conv2d (`ScaledConv2d` given `scale`) shaped as `conv`, on its device, in
    its dtype, with its full-width reference shape if it has one.

    It is built on the meta device and then allocated, so it draws no random numbers.
    """
    args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias, conv.padding_mode)
    with torch.device("meta"):
        new = nn.Conv2d(*args) if scale is None else ScaledConv2d(*args, scale_init=scale)
    new = new.to_empty(device=conv.weight.device).to(conv.weight.dtype)
    if scale is not None:
        with torch.no_grad():
            new.scale.fill_(scale)
    for name in _REFERENCE_ATTRIBUTES:
        if hasattr(conv, name):
            setattr(new, name, getattr(conv, name))
    return new


def replace_module_(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `root`."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent), attr, module)


def fused_with_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm1d | nn.BatchNorm2d, name: str
) -> tuple[nn.Parameter, nn.Parameter]:
    """`weight` and `bias` of a conv or Linear followed by `bn` in eval mode, as one layer."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{name!r} keeps no running statistics: its eval output has no fixed map")
    return fuse_conv_bn_weights(
        weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )


def check_unwrapped(model: object, signature: str) -> None:
    """TypeError unless `model` is an nn.Module; ValueError, with what to pass instead, for a
    DataParallel, DistributedDataParallel or torch.compile wrapper. `signature`: the caller's."""
    check_module(model, signature)
    function = signature.split("(")[0]
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError(f"{function} takes the network, not its {type(model).__name__} wrapper: "
                         "pass model.module")
    # torch.compile's OptimizedModule, named rather than imported (torch._dynamo is slow to load)
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise ValueError(f"{function} takes the network, not its torch.compile wrapper: pass "
                         "model._orig_mod (and compile the result)")


def logits_layer(
    model: nn.Module, node: object, calls: dict[str, list[fx.Node]]
) -> tuple[str | None, object]:
    """(name, None) of the Linear or Conv2d (called once) whose output alone gives the graph value
    `node` through ops that commute with a per-channel affine map (flatten from dim 1, adaptive
    average pooling, dropout, identity); (None, the value where that path stops) if there is none.
    """
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if type(module) in (nn.Linear, nn.Conv2d) and len(calls[node.target]) == 1:
                return node.target, None
            if not isinstance(module, _PASS_MODULES) or _flattens_channels(module):
                break
        elif not _passes_through(node):
            break
        node = node.args[0]
    return None, node


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


def _check_outputs(model: nn.Module, graph: fx.Graph, num_classes: int) -> None:
    """ValueError when the layer computing `model`'s output (if found) has not `num_classes`."""
    (output,) = [node for node in graph.nodes if node.op == "output"]
    name, _ = logits_layer(model, output.args[0], module_calls(graph))
    if name is None:
        return
    layer = model.get_submodule(name)
    outputs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if outputs != num_classes:
        raise ValueError(f"num_classes is {num_classes} but the network computes {outputs} "
                         f"outputs ({name!r}, {type(layer).__name__}): the LastBN normalises "
                         "each of them")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of `model`'s first floating parameter or buffer."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _keep_trainable_(new: nn.Conv2d, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Freeze what replaces frozen parameters: the weight and scalar follow `conv`'s weight, the
    bias `conv`'s bias and `bn`'s affine parameters (trainable if any of them is)."""
    new.weight.requires_grad_(conv.weight.requires_grad)
    if isinstance(new, ScaledConv2d):
        new.scale.requires_grad_(conv.weight.requires_grad)
    if new.bias is not None:
        sources = [p for p in (conv.bias, bn.weight, bn.bias) if p is not None] or [conv.weight]
        new.bias.requires_grad_(any(p.requires_grad for p in sources))


def _check_convertible(model: nn.Module) -> None:
    """Raise ValueError, naming the module, when `model` has nothing or other things to convert."""
    if is_mimicnorm(model):
        raise ValueError(f"{type(model).__name__} already has a LastBN: it is a MimicNorm network")
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, OTHER_NORMS):
            raise ValueError(
                f"{label!r} is a {type(module).__name__}: convert only replaces BatchNorm2d "
                "layers (MimicNorm keeps no normalisation in the body)"
            )
        if isinstance(module, nn.BatchNorm2d) and type(module) is not nn.BatchNorm2d:
            raise ValueError(
                f"{label!r} is a {type(module).__name__}, a BatchNorm2d subclass that may compute "
                "more than a BatchNorm2d: convert replaces plain BatchNorm2d layers only"
            )
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d: nothing to convert")


def module_calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """`{module name: its call nodes}` of `graph`."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _feeding_conv(
    model: nn.Module, source: object, calls: dict[str, list[fx.Node]]
) -> str | None:
    """The name of the plain Conv2d that computed `source` and feeds nothing else, if one did."""
    if not (isinstance(source, fx.Node) and source.op == "call_module"):
        return None
    single = len(source.users) == 1 and len(calls[source.target]) == 1
    plain = type(model.get_submodule(source.target)) is nn.Conv2d
    return source.target if single and plain else None


def _describe(model: nn.Module, source: object) -> str:
    """A short description of a graph value for error messages."""
    if not isinstance(source, fx.Node):
        return repr(source)
    if source.op == "placeholder":
        return "the network input"
    if source.op == "call_module":
        return f"{source.target!r} ({type(model.get_submodule(source.target)).__name__})"
    return source.name


def _projection_plan(family: str, convs_in_branch: int) -> ConvPlan:
    """The reference code's projection shortcut for `family` (see `PROJECTIONS`)."""
    if family == "imagenet":
        return ConvPlan(scale=CENTRING_GAIN)
    return ConvPlan(bias=convs_in_branch == 2)


def _residual_parts(module: nn.Module) -> tuple[list[nn.Conv2d], nn.Module | None] | None:
    """(branch convs in order, shortcut module) of a recognised residual block, else None."""
    if isinstance(module, ResidualBlock):
        return [m for m in module.branch if isinstance(m, nn.Conv2d)], module.shortcut
    if isinstance(module, _foreign_blocks()) and getattr(module, "se", None) is None:
        names = ("conv1", "conv2", "conv3") if hasattr(module, "conv3") else ("conv1", "conv2")
        return [getattr(module, name) for name in names], module.downsample
    return None


@functools.cache
def _foreign_blocks() -> tuple[type, ...]:
    """torchvision's ResNet blocks, and timm's when timm is installed (imported on first use, once:
    a failed import is not cached by Python and would be searched for at every module)."""
    from torchvision.models import resnet as tv_resnet

    blocks: tuple[type, ...] = (tv_resnet.BasicBlock, tv_resnet.Bottleneck)
    try:
        from timm.models import resnet as timm_resnet
    except ImportError:
        return blocks
    return blocks + (timm_resnet.BasicBlock, timm_resnet.Bottleneck)


def _warn_unrecognised(graph: fx.Graph, recognised: set[str]) -> None:
    """Warn about the modules whose own forward adds two tensors but get no residual scalar."""
    found: dict[str, str] = {}
    for node in graph.nodes:
        if not _adds_two_tensors(node):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        name, cls = next(reversed(stack.values())) if stack else ("", None)
        if name not in recognised:
            found.setdefault(name or "<root>", cls.__name__ if cls else "root module")
    if found:
        listed = ", ".join(f"{name} ({cls})" for name, cls in found.items())
        warnings.warn(
            f"convert: no residual scalar for these modules, which add tensors but are not "
            f"recognised residual blocks: {listed}",
            stacklevel=3,
        )


def _adds_two_tensors(node: fx.Node) -> bool:
    """True for an addition of two traced values (not of a value and a constant)."""
    if node.op == "call_function":
        adds = node.target in _ADD_FUNCTIONS
    else:
        adds = node.op == "call_method" and node.target in _ADD_METHODS
    return adds and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])


def _load_folded_(new: nn.Conv2d, conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_name: str) -> None:
    """Fill `new` (biased) with `conv` followed by `bn` in eval mode, divided by `new`'s scalar
    if any."""
    weight, bias = fused_with_bn(conv.weight, conv.bias, bn, bn_name)
    scale = new.scale.detach() if isinstance(new, ScaledConv2d) else 1.0
    with torch.no_grad():
        new.weight.copy_(weight / scale)
        new.bias.copy_(bias / scale)
