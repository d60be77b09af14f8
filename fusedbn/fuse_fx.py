"""The torch.fx pass behind convert_batchnorm(model, fuse_activations=True): finds

    BN -> act                 act: nn.ReLU / nn.LeakyReLU / nn.SiLU / nn.GELU(approximate="tanh"),
    BN -> add -> act               F.relu / torch.relu / x.relu() / F.leaky_relu / F.silu /
                                   F.gelu(approximate="tanh"), their inplace forms (inplace=True,
                                   relu_); add: +, +=, torch.add, x.add(...), x.add_(...)

and replaces the batch norm by a FusedBatchNormAct module under the same name (same Parameter
and buffer objects, so the state_dict keys and values do not change), calling it as
bn(x, residual=...) in place of the chain. What it cannot prove safe stays a plain FusedBatchNorm*
with a warning that names the layer:
  * the batch norm's output (or the add's) is used more than once,
  * the batch-norm module is called at several places,
  * the in-place add writes into the other operand (x += bn(y) would change x for its other users),
  * the module cannot be traced (each child module is then tried on its own).
A residual of a different shape, dtype or device is handled at run time (the module adds it the
ordinary way), so shapes need not be known here.
"""
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .act_modules import ACT_BY_BN, resolve_activation

_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.silu: "silu",
                  F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_INPLACE_ADDS = (operator.iadd, "add_")


class _Proxy(fx.Proxy):
    """fx.Proxy has no in-place operators, so `a += b` is traced as `a = a + b` and a tensor that
    aliases a (kept = a; a += b; use(kept)) would lose the update in the traced model. These record
    operator.iadd & co. instead, which the generated code runs in place, as the original does."""


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "lshift", "rshift", "matmul"):
    def _inplace(self, other, _op=getattr(operator, "i" + _name)):
        return self.tracer.create_proxy("call_function", _op, (self, other), {})
    setattr(_Proxy, f"__i{_name}__", _inplace)


class _Tracer(fx.Tracer):
    """Batch norms (torch's and ours) are leaves: the pass replaces them, it does not look in.
    In-place operators are recorded as such (_Proxy)."""

    def is_leaf_module(self, m, qualname):
        return (isinstance(m, nn.modules.batchnorm._BatchNorm)
                or super().is_leaf_module(m, qualname))

    def proxy(self, node):
        return _Proxy(node, self)


def _warn(msg):
    warnings.warn("fusedbn.convert_batchnorm: " + msg, UserWarning, stacklevel=4)


def _activation(node, root):
    """(name, negative_slope) when node applies a supported activation to its first argument and
    nothing else depends on run-time values; else None."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if type(mod) not in _ACT_MODULES or len(node.args) != 1 or node.kwargs:
            return None
        try:
            return resolve_activation(mod)
        except ValueError:  # nn.GELU without approximate="tanh"
            return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        kwargs = dict(node.kwargs)
        kwargs.pop("inplace", None)
        extra = list(node.args[1:])
        if name == "leaky_relu":
            slope = kwargs.pop("negative_slope", extra.pop(0) if extra else 0.01)
            if extra[:1] in ([True], [False]):  # F.leaky_relu(x, slope, inplace)
                extra.pop(0)
            if isinstance(slope, fx.Node) or extra or kwargs:
                return None
            return "leaky_relu", float(slope)
        if name == "gelu":
            approximate = kwargs.pop("approximate", extra.pop(0) if extra else "none")
            return ("gelu_tanh", 0.01) if approximate == "tanh" and not extra and not kwargs else None
        if extra[:1] in ([True], [False]):  # F.relu(x, inplace), F.silu(x, inplace)
            extra.pop(0)
        return (name, 0.01) if not extra and not kwargs else None
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target], 0.01
    return None


def _add_operands(node):
    """(a, b, inplace) for a two-tensor add without alpha, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if len(node.args) != 2 or node.kwargs:
            return None
        return node.args[0], node.args[1], node.target is operator.iadd
    if node.op == "call_method" and node.target in ("add", "add_"):
        if len(node.args) != 2 or node.kwargs:
            return None
        return node.args[0], node.args[1], node.target == "add_"
    return None


def _find_pattern(bn_node, root, name):
    """(residual node or None, the activation node, (act, slope)) for a fusable chain after
    bn_node, None when there is none; warns when there is one that is not provably safe."""
    if len(bn_node.args) != 1 or bn_node.kwargs:  # bn(x) only
        return None
    users = list(bn_node.users)
    if len(users) != 1:
        if any(_activation(u, root) or _add_operands(u) for u in users):
            _warn(f"{name}: its output is used {len(users)} times, so it is not fused with "
                  "the activation that follows; left as a plain fused batch norm")
        return None
    user = users[0]
    act = _activation(user, root)
    if act is not None and user.args[0] is bn_node:
        return None, user, act
    operands = _add_operands(user)
    if operands is None:
        return None
    a, b, inplace = operands
    other = b if a is bn_node else a
    if not isinstance(other, fx.Node) or other is bn_node:
        return None
    after = list(user.users)
    act = (_activation(after[0], root)
           if len(after) == 1 and after[0].args and after[0].args[0] is user else None)
    if act is None:
        if any(_activation(u, root) for u in after):
            _warn(f"{name}: the sum after it is used {len(after)} times, so it is not fused "
                  "with the add and the activation; left as a plain fused batch norm")
        return None
    if inplace and a is not bn_node:
        _warn(f"{name}: the in-place add after it writes into the other operand "
              f"({other.name}), which fusing would leave unchanged; not fused")
        return None
    return other, after[0], act


def _fuse_graph(gm, memory_saving):
    """Fuses the patterns of one traced GraphModule in place; returns the fused layers' names."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused, shared = [], set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        cls = _fusable_class(bn)
        if cls is None:
            continue
        found = _find_pattern(node, gm, node.target)
        if found is None:
            continue
        if calls[node.target] > 1:
            if node.target not in shared:
                _warn(f"{node.target}: the module is called at {calls[node.target]} places; "
                      "not fused")
                shared.add(node.target)
            continue
        residual, act_node, (act, slope) = found
        new_bn = _recast(bn, cls).set_activation(act, slope, memory_saving=memory_saving)
        parent, _, field = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), field, new_bn)
        with gm.graph.inserting_before(act_node):
            call = gm.graph.call_module(node.target, (node.args[0],),
                                        {"residual": residual} if residual is not None else {})
        act_node.replace_all_uses_with(call)
        chain = [act_node] + ([act_node.args[0]] if residual is not None else []) + [node]
        for dead in chain:
            gm.graph.erase_node(dead)
        fused.append(node.target)
    gm.graph.lint()
    gm.recompile()
    return fused


def _fusable_class(module):
    from .convert import _TO_FUSED
    fused_cls = _TO_FUSED.get(type(module), type(module))
    return ACT_BY_BN.get(fused_cls)


def _recast(module, cls):
    from .convert import _recast as recast
    return recast(module, cls)


def _restore_state(model, gm):
    """GraphModule copies only what the graph uses; give it back every submodule, parameter and
    buffer of model that it lacks (same objects, same names, same persistence), so that the
    state_dict keys do not change."""
    for name, mod in model.named_modules():
        target = gm if name == "" else _get_or_none(gm, name)
        if target is None:
            parent, _, field = name.rpartition(".")
            setattr(_get_or_none(gm, parent) if parent else gm, field, mod)
            continue
        if target is mod:
            continue
        if name:
            target.training = mod.training
        for field, p in mod.named_parameters(recurse=False):
            if field not in target._parameters:
                target.register_parameter(field, p)
        for field, b in mod.named_buffers(recurse=False):
            persistent = field not in mod._non_persistent_buffers_set
            if field not in target._buffers or (not persistent and
                                                field not in target._non_persistent_buffers_set):
                target._buffers.pop(field, None)
                target.register_buffer(field, b, persistent=persistent)


def _get_or_none(root, name):
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def fuse_activations(model, convert_plain, memory_saving=False, prefix=""):
    """Traces model, fuses BN (-> add) -> act chains (into modules with the given memory_saving),
    converts the remaining batch norms with convert_plain, and returns the new model (a
    GraphModule); untraceable modules are kept and their children tried one by one."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot prove it safe"
        for name, child in list(model.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(model, name, fuse_activations(child, convert_plain, memory_saving,
                                                      prefix + name + "."))
        direct = [prefix + n for n, c in model.named_children()
                  if isinstance(c, nn.modules.batchnorm._BatchNorm)]
        if direct:
            what = prefix.rstrip(".") or type(model).__name__
            _warn(f"cannot trace {what} with torch.fx ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); its batch norms "
                  f"{', '.join(direct)} are converted without fusing an activation")
        return convert_plain(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training
    _restore_state(model, gm)
    _fuse_graph(gm, memory_saving)
    return convert_plain(gm)
