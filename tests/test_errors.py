"""Every user-facing error: the exception type and the message (which names the argument at
fault), in the terms of the entry point the user called: a module's messages start with its class
name (a channel mismatch names the module and its num_features), fusedbn.functional.batch_norm's
with "fusedbn.functional.batch_norm: ", fusedbn.ops.batch_norm's with "fusedbn.ops.batch_norm: ";
torch's own checks keep torch's words."""
import pytest
import torch
import torch.nn as nn

import fusedbn
from bn_testing import FUSED_F

# ---------------------------------------------------------------------------------------------
# Modules: input rank and channel count
# ---------------------------------------------------------------------------------------------
WRONG_RANK = [
    (fusedbn.FusedBatchNorm1d, (2, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\)"),
    (fusedbn.FusedBatchNorm1d, (3,), r"expected 2D or 3D input \(got 1D input\)"),
    (fusedbn.FusedBatchNorm2d, (2, 3, 4), r"expected 4D input \(got 3D input\)"),
    (fusedbn.FusedBatchNorm2d, (2, 3, 4, 4, 4), r"expected 4D input \(got 5D input\)"),
    (fusedbn.FusedBatchNorm3d, (2, 3, 4, 4), r"expected 5D input \(got 4D input\)"),
    (fusedbn.FusedBatchNorm3d, (2, 3), r"expected 5D input \(got 2D input\)"),
]


@pytest.mark.parametrize("cls,shape,msg", WRONG_RANK,
                         ids=["%s-%dD" % (c.__name__, len(s)) for c, s, _ in WRONG_RANK])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_wrong_rank(device, cls, shape, msg, training):
    m = cls(3, device=device).train(training)
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(shape, device=device))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_module_channel_mismatch(device, training, affine, track):
    m = fusedbn.FusedBatchNorm2d(3, affine=affine, track_running_stats=track,
                                 device=device).train(training)
    before = [b.clone() for b in m.buffers()]
    with pytest.raises(RuntimeError, match=r"^FusedBatchNorm2d\(3\) expects 3 channels "
                                           r"\(num_features\), got input with 4 channels"):
        m(torch.randn(2, 4, 3, 3, device=device))
    for a, b in zip(m.buffers(), before):
        assert torch.equal(a, b), "a refused batch changed the module's state"


CHANNEL_MISMATCH = [
    (fusedbn.FusedBatchNorm1d, (8, 10)),
    (fusedbn.FusedBatchNorm1d, (8, 10, 5)),
    (fusedbn.FusedBatchNorm2d, (2, 10, 3, 3)),
    (fusedbn.FusedBatchNorm3d, (2, 10, 2, 3, 3)),
    (fusedbn.FusedBatchNormAct2d, (2, 10, 3, 3)),
]


@pytest.mark.parametrize("cls,shape", CHANNEL_MISMATCH,
                         ids=["%s-%dD" % (c.__name__, len(s)) for c, s in CHANNEL_MISMATCH])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_channel_mismatch_names_module_and_num_features(device, cls, shape, training):
    """The user's view: FusedBatchNorm2d(12) was given 10 channels."""
    m = cls(12, device=device).train(training)
    name = cls.__name__
    with pytest.raises(RuntimeError, match=r"^%s\(12\) expects 12 channels \(num_features\), "
                                           r"got input with 10 channels" % name):
        m(torch.randn(shape, device=device))


def test_module_channel_mismatch_under_no_grad_and_channels_last(device):
    m = fusedbn.FusedBatchNorm2d(12, device=device).eval()
    x = torch.randn(2, 10, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"^FusedBatchNorm2d\(12\) expects "
                                                            r"12 channels"):
        m(x)


def test_channel_count_free_without_per_channel_tensors(device):
    """affine=False, track_running_stats=False: nothing has a channel count, and torch normalizes
    an input with any number of channels; so must fusedbn."""
    x = torch.randn(3, 5, 4, 4, device=device)
    y = fusedbn.FusedBatchNorm2d(3, affine=False, track_running_stats=False, device=device)(x)
    y_t = nn.BatchNorm2d(3, affine=False, track_running_stats=False, device=device)(x)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,cls", [((1, 3, 1, 1), fusedbn.FusedBatchNorm2d),
                                       ((1, 3), fusedbn.FusedBatchNorm1d),
                                       ((1, 3, 1), fusedbn.FusedBatchNorm1d),
                                       ((1, 3, 1, 1, 1), fusedbn.FusedBatchNorm3d)],
                         ids=["2d", "1d_NC", "1d_NCL", "3d"])
def test_one_value_per_channel_in_training(device, shape, cls):
    m = cls(3, device=device)
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        FUSED_F(x, torch.zeros(3, device=device), torch.ones(3, device=device), training=True)
    # eval mode normalizes a single value per channel, as torch does
    m.eval()
    ref = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
        len(shape)](3, device=device).eval()
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# eps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive_in_training(device, eps):
    x = torch.randn(4, 3, 2, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        FUSED_F(x, rm, rv, training=True, eps=eps)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        FUSED_F(x, None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        fusedbn.FusedBatchNorm2d(3, eps=eps, device=device)(x)
    assert torch.equal(rm, torch.zeros(3, device=device)), "stats touched by a refused call"


def test_eps_must_be_non_negative_in_eval(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="batch_norm eps must be non-negative"):
        FUSED_F(x, rm, rv, training=False, eps=-1e-5)
    with pytest.raises(ValueError, match="batch_norm eps must be non-negative"):
        fusedbn.FusedBatchNorm2d(3, eps=-1e-5, device=device).eval()(x)


def test_module_eps_zero_in_eval(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    m = fusedbn.FusedBatchNorm2d(3, eps=0.0, device=device).eval()
    ref = nn.BatchNorm2d(3, eps=0.0, device=device).eval()
    with torch.no_grad():
        for mod in (m, ref):
            mod.running_var.fill_(0.7)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Per-channel tensors: shape, dtype; running_mean without running_var; eval without stats
# ---------------------------------------------------------------------------------------------
def fargs(device, dtype=torch.float32, C=3):
    return dict(input=torch.randn(4, 3, 2, 2, device=device, dtype=dtype),
                running_mean=torch.zeros(C, device=device), running_var=torch.ones(C,
                                                                                 device=device),
                weight=torch.ones(C, device=device), bias=torch.zeros(C, device=device))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("bad", [(4,), (2,), (3, 1), (1, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_channel_tensor_shape(device, name, bad, training):
    kw = fargs(device)
    kw[name] = torch.ones(bad, device=device)
    with pytest.raises(RuntimeError, match=r"^fusedbn\.functional\.batch_norm: %s must have "
                                           r"shape \(3,\)" % name):
        FUSED_F(training=training, **kw)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("input_dtype,bad_dtype", [
    (torch.float32, torch.float64), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16), (torch.bfloat16, torch.float16),
    (torch.float16, torch.float64), (torch.float64, torch.bfloat16),
    (torch.float32, torch.int64)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_channel_tensor_dtype(device, name, input_dtype, bad_dtype, training):
    kw = fargs(device, input_dtype)
    kw[name] = kw[name].to(bad_dtype)
    with pytest.raises(TypeError, match=r"^fusedbn\.functional\.batch_norm: %s must be" % name):
        FUSED_F(training=training, **kw)


def test_weight_and_bias_dtypes_must_agree(device):
    kw = fargs(device, torch.bfloat16)
    kw["weight"] = kw["weight"].to(torch.bfloat16)  # bias stays float32: each alone is allowed
    with pytest.raises(TypeError, match="weight and bias must have the same dtype"):
        FUSED_F(training=True, **kw)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_with_params_of_another_dtype(device, training):
    """A float64 or bfloat16 module on float32 input: TypeError naming the parameter (torch says
    'mixed dtype'). A float32 module is mixed precision for any input dtype and works."""
    x = torch.randn(4, 3, 2, 2, device=device)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        m = fusedbn.FusedBatchNorm2d(3, device=device, dtype=dtype).train(training)
        with pytest.raises(TypeError, match=r"^FusedBatchNorm2d: (weight|bias|running_mean|"
                                            r"running_var) must be"):
            m(x)
    m = fusedbn.FusedBatchNorm2d(3, device=device).train(training)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        y = m(x.to(dtype))
        assert y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_dtype(device, dtype, training):
    x = torch.ones(4, 3, 2, 2, device=device).to(dtype)
    msg = "input must be float32, float64, float16 or bfloat16"
    with pytest.raises(TypeError, match=msg):
        FUSED_F(x, torch.zeros(3, device=device), torch.ones(3, device=device),
                training=training)
    with pytest.raises(TypeError, match=msg):
        fusedbn.FusedBatchNorm2d(3, device=device).train(training)(x)


# ---------------------------------------------------------------------------------------------
# One prefix per entry point: whichever operator found the fault, the message starts with what
# the user called
# ---------------------------------------------------------------------------------------------
def _bad_calls(device):
    """(description, kwargs of fargs changed, training) that fusedbn refuses in its own words."""
    return [
        ("weight shape, train", {"weight": torch.ones(4, device=device)}, True),
        ("weight shape, eval", {"weight": torch.ones(4, device=device)}, False),
        ("running_var dtype, train", {"running_var": torch.ones(3, device=device,
                                                                dtype=torch.float64)}, True),
        ("running_mean shape, train", {"running_mean": torch.zeros(4, device=device)}, True),
        ("running_var dtype, eval", {"running_var": torch.ones(3, device=device,
                                                               dtype=torch.float64)}, False),
        ("integer input, train", {"input": torch.ones(4, 3, 2, 2, device=device,
                                                      dtype=torch.int64)}, True),
        ("integer input, eval", {"input": torch.ones(4, 3, 2, 2, device=device,
                                                     dtype=torch.int64)}, False),
    ]


@pytest.mark.parametrize("entry", ["fusedbn.functional.batch_norm", "fusedbn.ops.batch_norm"])
def test_one_prefix_per_function(device, entry):
    call = {"fusedbn.functional.batch_norm": FUSED_F,
            "fusedbn.ops.batch_norm": lambda input, running_mean, running_var, weight, bias,
            training: fusedbn.ops.batch_norm(input, running_mean, running_var, weight, bias,
                                             training, 0.1, 1e-5)}[entry]
    for what, change, training in _bad_calls(device):
        kw = dict(fargs(device), **change)
        with pytest.raises((RuntimeError, TypeError)) as info:
            call(training=training, **kw)
        assert str(info.value).startswith(entry + ": "), (what, str(info.value))


def test_one_prefix_per_module(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    for training in (True, False):
        for dtype in (torch.float64, torch.bfloat16):  # parameters the input cannot use
            m = fusedbn.FusedBatchNorm2d(3, device=device, dtype=dtype).train(training)
            with pytest.raises(TypeError, match=r"^FusedBatchNorm2d: \w+ must be"):
                m(x)
        m = fusedbn.FusedBatchNorm2d(3, device=device).train(training)
        with pytest.raises(TypeError, match=r"^FusedBatchNorm2d: input must be float32, float64, "
                                            r"float16 or bfloat16, got int64"):
            m(x.long())
    m = fusedbn.FusedBatchNorm1d(3, device=device)
    with pytest.raises(TypeError, match=r"^FusedBatchNorm1d: input must be float32"):
        m(torch.ones(4, 3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("residual", [False, True])
def test_one_prefix_per_act_module(device, residual):
    """The fused BN + activation modules name themselves too, whichever op refused the call."""
    x = torch.randn(4, 3, 2, 2, device=device)
    r = torch.randn(4, 3, 2, 2, device=device) if residual else None
    for training in (True, False):
        m = fusedbn.FusedBatchNormAct2d(3, activation="relu", device=device,
                                        dtype=torch.float64).train(training)
        with pytest.raises(TypeError, match=r"^FusedBatchNormAct2d: \w+ must be"):
            m(x, residual=r)
        m = fusedbn.FusedBatchNormAct2d(3, activation="relu", device=device).train(training)
        with pytest.raises(TypeError, match=r"^FusedBatchNormAct2d: input must be float32, "
                                            r"float64, float16 or bfloat16, got int64"):
            m(x.long(), residual=None if r is None else r.long())


def test_torch_wording_kept(device):
    """Where torch has a message, fusedbn's module gives torch's (no prefix of its own)."""
    x = torch.randn(4, 3, 2, 2, device=device)
    for cls_f, cls_t in ((fusedbn.FusedBatchNorm2d, nn.BatchNorm2d),):
        for bad, kw in ((torch.randn(4, 3, 2, device=device), {}), (x, {"eps": 0.0})):
            with pytest.raises(ValueError) as ours:
                cls_f(3, device=device, **kw)(bad)
            with pytest.raises(ValueError) as theirs:
                cls_t(3, device=device, **kw)(bad)
            assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_running_mean_without_running_var(device, given):
    kw = fargs(device)
    kw["running_var" if given == "running_mean" else "running_mean"] = None
    # torch's ValueError; the wording may differ but must name both arguments
    with pytest.raises(ValueError, match=r"^fusedbn\.functional\.batch_norm: running_mean and "
                                         r"running_var must"):
        FUSED_F(training=True, **kw)


def test_eval_without_running_stats(device):
    kw = fargs(device)
    kw["running_mean"] = kw["running_var"] = None
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        FUSED_F(training=False, **kw)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def test_check_device_supported_meta():
    with pytest.raises(RuntimeError, match="no kernels for device type 'meta'"):
        fusedbn.ops._check_device_supported(torch.empty(2, 3, device="meta"))


def test_check_device_supported_cpu():
    fusedbn.ops._check_device_supported(torch.empty(2, 3))  # no error
    assert "cpu" in fusedbn.build_info()["backends"]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device to create a CUDA tensor")
@pytest.mark.skipif("cuda" in fusedbn.build_info()["backends"],
                    reason="this fusedbn has CUDA kernels: the CPU-only advice does not apply")
def test_cuda_tensor_on_cpu_only_build():
    x = torch.randn(4, 3, 2, 2, device="cuda")
    with pytest.raises(RuntimeError, match="(?s)built without CUDA.*FORCE_CUDA=1"):
        fusedbn.FusedBatchNorm2d(3, device="cuda")(x)
    with pytest.raises(RuntimeError, match="(?s)built without CUDA.*FORCE_CUDA=1"):
        fusedbn.ops._check_device_supported(x)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_per_channel_tensor_on_another_device(name):
    kw = fargs("cuda")
    kw[name] = kw[name].cpu()
    with pytest.raises(RuntimeError, match="%s must be on the input's device" % name):
        FUSED_F(training=True, **kw)
