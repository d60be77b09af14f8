"""torch's own test inputs of batch norm, through fusedbn: every sample input of torch's OpInfo for
`nn.functional.batch_norm` (torch.testing._internal.common_methods_invocations) through
fusedbn.functional.batch_norm, and every ModuleInput / ErrorModuleInput of its ModuleInfo entries
for BatchNorm1d/2d/3d (torch.testing._internal.common_modules) through FusedBatchNorm1d/2d/3d and
FusedBatchNormAct1d/2d/3d(activation="identity").

Each must give torch's result -- output, the gradients torch's samples ask for (requires_grad),
the running statistics and num_batches_tracked, under the comparison rule of bn_testing.py
against a float64 reference -- or raise torch's exception type, leaving every state untouched.
Plus the 1-D edge cases of F.batch_norm the OpInfo samples touch only in part.

The samples' own values (make_tensor: uniform in [-9, 9], running_var in [0, 9], momentum -1.2,
eps 0.5 ...) are used as they come; the module samples' parameters and buffers, which torch leaves
at their initial 1/0, are randomized (bn_testing.randomize_) so that a swapped weight shows.
"""
import copy

import pytest

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest "
                    "(scripts/setup_env.sh installs it)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import fusedbn  # noqa: E402
from bn_testing import assert_parity, randomize_  # noqa: E402

OPINFOS = [op for op in op_db if op.name == "nn.functional.batch_norm"]
MODULE_INFOS = [m for m in module_db
                if m.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                    torch.nn.BatchNorm3d)]
FUSED = {torch.nn.BatchNorm1d: fusedbn.FusedBatchNorm1d,
         torch.nn.BatchNorm2d: fusedbn.FusedBatchNorm2d,
         torch.nn.BatchNorm3d: fusedbn.FusedBatchNorm3d}
FUSED_ACT = {torch.nn.BatchNorm1d: fusedbn.FusedBatchNormAct1d,
             torch.nn.BatchNorm2d: fusedbn.FusedBatchNormAct2d,
             torch.nn.BatchNorm3d: fusedbn.FusedBatchNormAct3d}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def test_torch_has_the_samples():
    """The lists below are not empty by accident (a renamed entry would make every test vanish)."""
    assert len(OPINFOS) >= 1
    assert {m.module_cls for m in MODULE_INFOS} == set(FUSED)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _copy_arg(t, dtype=None):
    """A fresh leaf with the same values (cast to dtype when given) and requires_grad."""
    if not isinstance(t, torch.Tensor):
        return t
    c = t.detach().clone() if dtype is None else t.detach().to(dtype)
    return c.requires_grad_(t.requires_grad)


def _call(fn, tensors, kwargs):
    """(result or exception, the arguments as called: running statistics mutated in place)."""
    try:
        return fn(*tensors, **kwargs), tensors
    except Exception as e:  # noqa: BLE001 -- compared with torch's own below
        return e, tensors


def _grads(y, args, dy):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not leaves or not y.requires_grad:
        return [None] * len(args)
    got = iter(torch.autograd.grad(y, leaves, dy, allow_unused=True))
    return [next(got) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]


def _compare_exceptions(what, ours, theirs):
    assert isinstance(ours, Exception), (
        "%s: torch raises %s(%s), fusedbn returned a result" % (what, type(theirs).__name__,
                                                               theirs))
    assert isinstance(ours, type(theirs)), (
        "%s: torch raises %s (%s), fusedbn %s (%s)" % (what, type(theirs).__name__, theirs,
                                                       type(ours).__name__, ours))


# ---- OpInfo: nn.functional.batch_norm -----------------------------------------------------------

def _op_samples():
    cases = []
    for op in OPINFOS:
        for dtype in DTYPES:
            for requires_grad in (True, False):
                samples = list(op.sample_inputs("cpu", dtype, requires_grad=requires_grad))
                for i, s in enumerate(samples):
                    cases.append(pytest.param(
                        s, dtype, id="%s%s-%s-%s-%d" % (
                            op.name, "." + op.variant_test_name if op.variant_test_name else "",
                            _name(dtype), "grad" if requires_grad else "nograd", i)))
    return cases


@pytest.mark.parametrize("sample,dtype", _op_samples())
def test_opinfo_sample(sample, dtype):
    """fusedbn.functional.batch_norm on one of torch's samples: torch's exception type, or its
    output, gradients and running statistics (against a float64 reference)."""
    args = [sample.input] + list(sample.args)
    kwargs = dict(sample.kwargs)
    what = "F.batch_norm(%s, %s)" % (
        ", ".join("None" if a is None else "%s%s" % (_name(a.dtype), tuple(a.shape))
                  for a in args), kwargs)
    before = [_copy_arg(a) for a in args]
    theirs, t_args = _call(F.batch_norm, [_copy_arg(a) for a in args], kwargs)
    ours, o_args = _call(fusedbn.functional.batch_norm, [_copy_arg(a) for a in args], kwargs)
    if isinstance(theirs, Exception):
        _compare_exceptions(what, ours, theirs)
        for a, b in zip(o_args, before):  # a rejected call changes nothing
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), what + ": an argument changed in a rejected call"
        return
    assert not isinstance(ours, Exception), "%s: torch returns a result, fusedbn raises %r" % (
        what, ours)
    ref, r_args = _call(F.batch_norm, [_copy_arg(a, torch.float64) for a in args], kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.requires_grad == theirs.requires_grad, what + ": requires_grad differs"
    scale = ref.detach().abs().max() if ref.numel() else None
    assert_parity(what + " output", ours, theirs, ref, scale=scale)
    # running_mean and running_var (arguments 1 and 2), updated in place in training
    for k, name in ((1, "running_mean"), (2, "running_var")):
        if o_args[k] is not None:
            assert_parity("%s %s" % (what, name), o_args[k], t_args[k], r_args[k])
    if theirs.requires_grad:
        dy = torch.randn(theirs.shape, dtype=torch.float64)
        g_t = _grads(theirs, t_args, dy.to(dtype))
        g_o = _grads(ours, o_args, dy.to(dtype))
        g_r = _grads(ref, r_args, dy)
        for k, name in ((0, "grad_input"), (3, "grad_weight"), (4, "grad_bias")):
            if g_t[k] is None:
                assert g_o[k] is None, "%s %s: torch gives none, fusedbn one" % (what, name)
                continue
            assert g_o[k] is not None, "%s %s: missing" % (what, name)
            sc = g_r[k].abs().max() if g_r[k].numel() else None
            assert_parity("%s %s" % (what, name), g_o[k], g_t[k], g_r[k], scale=sc)


# ---- 1-D inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("training,stats", [(True, "none"), (True, "empty"), (True, "three"),
                                            (False, "empty"), (False, "three")])
@pytest.mark.parametrize("affine", ["none", "weight", "both", "empty_weight"])
def test_empty_1d_input(training, stats, affine):
    """An empty (0,) input: torch returns an empty output (a copy of the input, times weight[0]
    and plus bias[0] when given; IndexError for an empty weight); so does fusedbn, with a
    gradient chain, and the running statistics are left alone. (Eval mode without running
    statistics is refused: test_1d_input_errors.)"""
    st = {"none": None, "empty": 0, "three": 3}[stats]

    def args():
        x = torch.empty(0, requires_grad=True)
        rm = None if st is None else torch.randn(st)
        rv = None if st is None else torch.rand(st) + 0.5
        w = b = None
        if affine in ("weight", "both"):
            w = torch.randn(3, requires_grad=True)
        if affine == "both":
            b = torch.randn(3, requires_grad=True)
        if affine == "empty_weight":
            w = torch.empty(0, requires_grad=True)
        return [x, rm, rv, w, b]

    torch.manual_seed(0)
    a_t = args()
    torch.manual_seed(0)
    a_o = args()
    theirs, _ = _call(F.batch_norm, a_t, {"training": training})
    ours, _ = _call(fusedbn.functional.batch_norm, a_o, {"training": training})
    for k in (1, 2):
        if a_o[k] is not None:
            assert torch.equal(a_o[k], a_t[k])
    if isinstance(theirs, Exception):
        _compare_exceptions("(0,) input", ours, theirs)
        return
    assert not isinstance(ours, Exception), ours
    assert ours.shape == theirs.shape == (0,) and ours.dtype == theirs.dtype
    assert ours.requires_grad and theirs.requires_grad
    dy = torch.empty(0)
    for got, want in zip(_grads(ours, a_o, dy), _grads(theirs, a_t, dy)):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(5,), (1,), ()])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stats", ["given", "none"])
def test_1d_input_errors(shape, training, stats):
    """A non-empty 1-D (or 0-D) input has no channel dimension: torch refuses it with its own
    messages, fusedbn with torch's exception type -- except where torch's is an accident of
    reading size(1) (an IndexError: training, no running statistics, 1-D input), where fusedbn
    raises the RuntimeError that names the input's dimensions, as for every other refused input
    of fewer than 2 dimensions."""
    x = torch.randn(shape)
    n = x.numel()
    rm, rv = (torch.zeros(n), torch.ones(n)) if stats == "given" else (None, None)
    with pytest.raises(Exception) as theirs:
        F.batch_norm(x, rm, rv, training=training)
    if theirs.type is IndexError and "Dimension out of range" in str(theirs.value):
        expected = RuntimeError
    else:
        expected = theirs.type
    with pytest.raises(expected) as ours:
        fusedbn.functional.batch_norm(x, rm, rv, training=training)
    if expected is RuntimeError and "running_mean must be defined" not in str(ours.value):
        assert ours.match(r"^fusedbn\.batch_norm: input must have at least 2 dimensions "
                          r"\(N, C, \*\), got %dD input" % x.dim())


# ---- ModuleInfo: BatchNorm1d/2d/3d --------------------------------------------------------------

def _module_cases():
    cases = []
    for info in MODULE_INFOS:
        name = info.module_cls.__name__
        for dtype in info.dtypes:
            for training in (True, False):
                inputs = info.module_inputs_func(info, "cpu", dtype, True, training)
                for i, mi in enumerate(inputs):
                    cases.append(pytest.param(info, mi, dtype, training, id="%s-%s-%s-%s" % (
                        name, mi.desc or i, _name(dtype), "train" if training else "eval")))
    return cases


def _make(cls, constructor_input, dtype, fused=None, **extra):
    args, kwargs = constructor_input.args, constructor_input.kwargs
    m = cls(*args, **kwargs, **extra).to(dtype)
    if fused is not None:
        m.load_state_dict(fused.state_dict())
    return m


def _module_step(m, inputs, dy):
    """Forward and backward of m on fresh copies of inputs: (output, input grads)."""
    xs = [_copy_arg(x) for x in inputs]
    y = m(*xs)
    leaves = [x for x in xs if x.requires_grad] + [p for p in m.parameters() if p.requires_grad]
    if y.requires_grad and leaves:
        y.backward(dy.to(y.dtype))
    return y.detach(), [x.grad for x in xs]


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _compare_modules(what, ours, theirs, ref):
    for (k, a), (_, b), (_, r) in zip(ours.named_parameters(), theirs.named_parameters(),
                                      ref.named_parameters()):
        assert (a.grad is None) == (b.grad is None), "%s %s.grad: presence differs" % (what, k)
        if a.grad is not None:
            assert_parity("%s %s.grad" % (what, k), a.grad, b.grad, r.grad,
                          scale=r.grad.abs().max())
    so, st, sr = ours.state_dict(), theirs.state_dict(), ref.state_dict()
    assert so.keys() == st.keys()
    for k in so:
        if k.endswith("num_batches_tracked"):
            assert so[k].dtype == torch.long and int(so[k]) == int(st[k]), (
                "%s %s: %d, torch %d" % (what, k, int(so[k]), int(st[k])))
        elif k.startswith("running"):
            assert_parity("%s %s" % (what, k), so[k], st[k], sr[k])


@pytest.mark.parametrize("variant", ["FusedBatchNorm", "FusedBatchNormAct-identity"])
@pytest.mark.parametrize("info,module_input,dtype,training", _module_cases())
def test_module_input(info, module_input, dtype, training, variant):
    """One ModuleInput: the module built from the same constructor arguments (and the same
    randomized state), two forward/backward steps in train or eval mode, compared with torch's
    module step by step: outputs, input and parameter gradients, running statistics and
    num_batches_tracked."""
    torch.manual_seed(0)
    theirs = _make(info.module_cls, module_input.constructor_input, dtype)
    randomize_(theirs, num_batches_tracked=3)
    if variant == "FusedBatchNorm":
        ours = _make(FUSED[info.module_cls], module_input.constructor_input, dtype, theirs)
    else:
        ours = _make(FUSED_ACT[info.module_cls], module_input.constructor_input, dtype, theirs,
                     activation="identity")
    ref = copy.deepcopy(theirs).double()
    for m in (ours, theirs, ref):
        m.train(training)
    inputs = list(module_input.forward_input.args)
    assert not module_input.forward_input.kwargs
    for step in range(2):
        what = "%s step %d" % (variant, step)
        dy = torch.randn(inputs[0].shape, dtype=torch.float64)
        y_t, dx_t = _module_step(theirs, inputs, dy)
        y_o, dx_o = _module_step(ours, inputs, dy)
        y_r, dx_r = _module_step(ref, [_copy_arg(x, torch.float64) for x in inputs], dy)
        assert y_o.dtype == y_t.dtype and y_o.shape == y_t.shape
        sc = y_r.abs().max() if y_r.numel() else None
        assert_parity(what + " output", y_o, y_t, y_r, scale=sc)
        for k, (a, b, r) in enumerate(zip(dx_o, dx_t, dx_r)):
            assert (a is None) == (b is None)
            if a is not None:
                assert_parity("%s grad_input %d" % (what, k), a, b, r,
                              scale=r.abs().max() if r.numel() else None)
        _compare_modules(what, ours, theirs, ref)


def _module_error_cases():
    cases = []
    for info in MODULE_INFOS:
        for dtype in info.dtypes:
            for training in (True, False):
                errs = info.module_error_inputs_func(info, "cpu", dtype, True, training)
                for i, e in enumerate(errs):
                    cases.append(pytest.param(info, e, dtype, training, id="%s-%d-%s-%s" % (
                        info.module_cls.__name__, i, _name(dtype),
                        "train" if training else "eval")))
    return cases


@pytest.mark.parametrize("variant", ["FusedBatchNorm", "FusedBatchNormAct-identity"])
@pytest.mark.parametrize("info,error_input,dtype,training", _module_error_cases())
def test_module_error_input(info, error_input, dtype, training, variant):
    """torch's ErrorModuleInputs (eps <= 0): in training, its exception type and message pattern,
    nothing counted; in eval mode (where torch accepts eps = 0 and refuses only eps < 0), whatever
    torch does: the same exception type, or the same output."""
    mi = error_input.module_error_input
    theirs = _make(info.module_cls, mi.constructor_input, dtype)
    if variant == "FusedBatchNorm":
        ours = _make(FUSED[info.module_cls], mi.constructor_input, dtype, theirs)
    else:
        ours = _make(FUSED_ACT[info.module_cls], mi.constructor_input, dtype, theirs,
                     activation="identity")
    theirs.train(training)
    ours.train(training)
    before = _state(ours)
    x = mi.forward_input.args[0]
    try:
        y_t = theirs(_copy_arg(x))
    except Exception as e:  # noqa: BLE001
        if training:
            assert isinstance(e, error_input.error_type)
        with pytest.raises(type(e), match=error_input.error_regex if training else None):
            ours(_copy_arg(x))
        for k, v in _state(ours).items():
            assert torch.equal(v, before[k]), "%s changed in a rejected call" % k
        return
    assert not training, "torch accepted its own error input"
    torch.testing.assert_close(ours(_copy_arg(x)), y_t)
