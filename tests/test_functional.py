"""fusedbn.functional.batch_norm against torch.nn.functional.batch_norm: same signature, same
results and gradients, running statistics mutated in place exactly as torch mutates them."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import fusedbn
from bn_testing import (DTYPE_PAIRS, FUSED_F, TORCH_F, assert_parity, clone_or_none,
                        dtype_pair_id, functional_call, in_layout, random_values, term_scales,
                        torch_supports)


def test_signature_matches_torch():
    ours = inspect.signature(fusedbn.functional.batch_norm)
    theirs = inspect.signature(F.batch_norm)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        assert ours.parameters[name].default == p.default, name
        assert ours.parameters[name].kind == p.kind, name


def channel_tensors(C, param_dtype, device, with_weight, with_bias, with_stats):
    def t(v):
        return v.to(device=device, dtype=param_dtype)
    w = t(1 + 0.5 * torch.randn(C, dtype=torch.float64)) if with_weight else None
    b = t(torch.randn(C, dtype=torch.float64)) if with_bias else None
    rm = t(0.5 * torch.randn(C, dtype=torch.float64)) if with_stats else None
    rv = t(0.5 + torch.rand(C, dtype=torch.float64)) if with_stats else None
    return w, b, rm, rv


def check_functional(x, dy, w, b, rm, rv, training, momentum, eps, input_dtype, param_dtype):
    # fusedbn, on its own copies of the running statistics (mutated in place)
    rm_o, rv_o = clone_or_none(rm), clone_or_none(rv)
    ptrs = (rm_o.data_ptr(), rv_o.data_ptr()) if rm is not None else None
    y, dx, dw, db = functional_call(FUSED_F, x, dy, w, b, rm_o, rv_o, training, momentum, eps)
    # float64 reference
    f64 = torch.float64
    rm_r, rv_r = clone_or_none(rm, f64), clone_or_none(rv, f64)
    ref = functional_call(TORCH_F, x.double(), dy.double(), clone_or_none(w, f64),
                          clone_or_none(b, f64), rm_r, rv_r, training, momentum, eps)
    # torch with the same dtypes
    rm_t, rv_t = clone_or_none(rm), clone_or_none(rv)
    if torch_supports(input_dtype, param_dtype):
        theirs = functional_call(TORCH_F, x, dy, w, b, rm_t, rv_t, training, momentum, eps)
    else:
        theirs = (None,) * 4
        rm_t = rv_t = None
    scales = term_scales(x, dy, w, b, training or rm is None, eps, rm, rv)
    for name, o, t, r, dt in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                                 (y, dx, dw, db), theirs, ref,
                                 (input_dtype, input_dtype, param_dtype, param_dtype)):
        assert (o is None) == (r is None), name
        if o is not None:
            assert_parity(name, o, t, r, dt, scales[name])
    if rm is not None:
        assert (rm_o.data_ptr(), rv_o.data_ptr()) == ptrs, "running stats must be updated in place"
        assert_parity("running_mean", rm_o, rm_t, rm_r, param_dtype)
        assert_parity("running_var", rv_o, rv_t, rv_r, param_dtype)
        if not training:
            assert torch.equal(rm_o, rm) and torch.equal(rv_o, rv)
    if x.is_cuda:  # fusedbn's CPU path on the same data in torch's part of the rule
        cpu = [None if t is None else t.cpu() for t in (x, dy, w, b, rm, rv)]
        rm_c, rv_c = clone_or_none(cpu[4]), clone_or_none(cpu[5])
        got = functional_call(FUSED_F, cpu[0], cpu[1], cpu[2], cpu[3], rm_c, rv_c, training,
                              momentum, eps)
        for name, o, c, r, dt in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                                     (y, dx, dw, db), got, ref,
                                     (input_dtype, input_dtype, param_dtype, param_dtype)):
            if o is not None:
                assert_parity("cuda vs cpu " + name, o, c, r, dt, scales[name])
        if rm is not None:
            assert_parity("cuda vs cpu running_mean", rm_o, rm_c, rm_r, param_dtype)
            assert_parity("cuda vs cpu running_var", rv_o, rv_c, rv_r, param_dtype)
    return y


ARGS = {  # (weight, bias, running stats)
    "all": (True, True, True),
    "no_weight": (False, True, True),
    "no_bias": (True, False, True),
    "no_affine": (False, False, True),
    "no_stats": (True, True, False),
    "nothing": (False, False, False),
}


# eval mode needs running statistics (its absence is an error, tested in test_errors.py)
COMBOS = [(args, training, momentum) for args in ARGS
          for training, momentum in [(True, 0.1), (True, 0.0), (True, 1.0), (False, 0.1)]
          if training or ARGS[args][2]]


@pytest.mark.parametrize("args,training,momentum", COMBOS,
                         ids=["%s-%s-m%s" % (a, "train" if t else "eval", m) for a, t, m in COMBOS])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_channels"])
def test_functional_parity(device, args, training, momentum, dtypes, layout):
    with_w, with_b, with_stats = ARGS[args]
    input_dtype, param_dtype = dtypes
    shape = (4, 5, 6, 3)
    x = in_layout(random_values(shape), input_dtype, layout, device)
    dy = in_layout(random_values(shape), input_dtype, layout, device)
    w, b, rm, rv = channel_tensors(5, param_dtype, device, with_w, with_b, with_stats)
    check_functional(x, dy, w, b, rm, rv, training, momentum, 1e-5, input_dtype, param_dtype)


@pytest.mark.parametrize("shape", [(7, 3), (3, 3, 5), (2, 3, 2, 3, 4)], ids=["NC", "NCL", "3d"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_functional_ranks_and_eps(device, shape, training, eps):
    x = in_layout(random_values(shape), torch.float32, "contiguous", device)
    dy = in_layout(random_values(shape), torch.float32, "contiguous", device)
    w, b, rm, rv = channel_tensors(3, torch.float32, device, True, True, True)
    check_functional(x, dy, w, b, rm, rv, training, 0.3, eps, torch.float32, torch.float32)


def test_functional_eps_zero_in_eval(device):
    """eps = 0 is allowed in eval mode, as in torch."""
    shape = (3, 4, 5, 5)
    x = in_layout(random_values(shape), torch.float32, "contiguous", device)
    dy = in_layout(random_values(shape), torch.float32, "contiguous", device)
    w, b, rm, rv = channel_tensors(4, torch.float32, device, True, True, True)
    check_functional(x, dy, w, b, rm, rv, False, 0.1, 0.0, torch.float32, torch.float32)


@pytest.mark.parametrize("training", [True, False])
def test_functional_without_autograd(device, training):
    """Under no_grad and inference_mode (BN recalibration, inference) results and running-stat
    updates are unchanged."""
    shape = (6, 3, 4, 4)
    x = random_values(shape).float().to(device)
    w, b, rm, rv = channel_tensors(3, torch.float32, device, True, True, True)
    rm_t, rv_t = rm.clone(), rv.clone()
    expected = TORCH_F(x, rm_t, rv_t, w, b, training, 0.1, 1e-5)
    for ctx in (torch.no_grad, torch.inference_mode):
        rm_o, rv_o = rm.clone(), rv.clone()
        with ctx():
            y = FUSED_F(x, rm_o, rv_o, w, b, training, 0.1, 1e-5)
        assert not y.requires_grad
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm_o, rm_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv_o, rv_t, rtol=1e-5, atol=1e-6)


def test_functional_keyword_call(device):
    shape = (5, 2, 3)
    x = random_values(shape).float().to(device)
    w, b, rm, rv = channel_tensors(2, torch.float32, device, True, True, True)
    rm2, rv2 = rm.clone(), rv.clone()
    y = FUSED_F(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True,
                momentum=0.2, eps=1e-3)
    y_t = TORCH_F(input=x, running_mean=rm2, running_var=rv2, weight=w, bias=b, training=True,
                  momentum=0.2, eps=1e-3)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rv2, rtol=1e-5, atol=1e-6)
