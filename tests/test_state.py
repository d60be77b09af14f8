"""State: state_dict round trips between nn.BatchNorm* and fusedbn modules (strict), deepcopy,
pickling through torch.save / torch.load of single modules and of models that contain them."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fusedbn
from bn_testing import FUSED_BY_RANK, NN_BY_RANK, randomize_

RANKS = {"1d": 3, "2d": 4, "3d": 5}
OPTIONS = [dict(), dict(affine=False), dict(track_running_stats=False), dict(bias=False),
           dict(momentum=None)]
OPTION_IDS = ["default", "affine_False", "no_stats", "bias_False", "momentum_None"]


def sample(rank, C, device, dtype=torch.float32):
    return torch.randn((4, C) + (3,) * (rank - 2), device=device, dtype=dtype)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
        assert torch.equal(sa[k], sb[k]), k


def trained(module, rank, device, steps=2):
    """A module whose buffers moved away from their initial values (and whose num_batches_tracked
    is not 0)."""
    randomize_(module)
    module.train()
    for _ in range(steps):
        module(sample(rank, module.num_features, device, module.weight.dtype
                      if module.weight is not None else torch.float32))
    return module


@pytest.mark.parametrize("kind", list(RANKS))
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_state_dict_round_trips(device, kind, options):
    rank = RANKS[kind]
    plain = trained(NN_BY_RANK[rank](5, device=device, **options), rank, device)
    fused = FUSED_BY_RANK[rank](5, device=device, **options)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)
    assert_same_state(fused, plain)
    # and back: a fused module trained further, loaded into a plain one
    trained(fused, rank, device)
    plain2 = NN_BY_RANK[rank](5, device=device, **options)
    plain2.load_state_dict(fused.state_dict(), strict=True)
    assert_same_state(plain2, fused)
    # same outputs in eval mode after the round trip
    fused.eval()
    plain2.eval()
    x = sample(rank, 5, device)
    torch.testing.assert_close(fused(x), plain2(x), rtol=1e-5, atol=1e-5)


def test_state_dict_of_a_model(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)).to(device)
    for _ in range(2):
        model(torch.randn(5, 3, 6, 6, device=device))
    fused = fusedbn.convert_batchnorm(copy.deepcopy(model))
    assert isinstance(fused[1], fusedbn.FusedBatchNorm2d)
    assert_same_state(fused, model)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), fusedbn.FusedBatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
                          fusedbn.FusedBatchNorm1d(6)).to(device)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert_same_state(fresh, model)


@pytest.mark.parametrize("kind", list(RANKS))
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_deepcopy(device, kind, options):
    rank = RANKS[kind]
    m = trained(FUSED_BY_RANK[rank](4, device=device, **options), rank, device)
    c = copy.deepcopy(m)
    assert type(c) is type(m)
    assert_same_state(c, m)
    for (_, p), (_, q) in zip(m.named_parameters(), c.named_parameters()):
        assert p is not q and p.data_ptr() != q.data_ptr()
    x = sample(rank, 4, device)
    torch.testing.assert_close(c(x), m(x), rtol=1e-6, atol=1e-6)
    for k, v in m.state_dict().items():  # both were updated by the same training step
        torch.testing.assert_close(c.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", list(RANKS))
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_pickle_module(device, kind, options):
    rank = RANKS[kind]
    m = trained(FUSED_BY_RANK[rank](4, device=device, **options), rank, device)
    m.eval()
    loaded = save_load(m)
    assert type(loaded) is type(m) and not loaded.training
    assert (loaded.eps, loaded.momentum, loaded.affine, loaded.track_running_stats) == (
        m.eps, m.momentum, m.affine, m.track_running_stats)
    assert_same_state(loaded, m)
    x = sample(rank, 4, device)
    torch.testing.assert_close(loaded(x), m(x), rtol=1e-6, atol=1e-6)


def test_pickle_model_and_state_dict(device):
    model = nn.Sequential(nn.Conv3d(2, 3, 1), fusedbn.FusedBatchNorm3d(3), nn.Flatten(2),
                          fusedbn.FusedBatchNorm1d(3, momentum=None)).to(device)
    for _ in range(3):
        model(torch.randn(4, 2, 2, 3, 3, device=device))
    model.eval()
    loaded = save_load(model)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert_same_state(loaded, model)
    x = torch.randn(4, 2, 2, 3, 3, device=device)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)
    # a state_dict saved with weights_only=True loads into a plain torch model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    plain = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.Flatten(2),
                          nn.BatchNorm1d(3, momentum=None)).to(device)
    plain.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    plain.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_module_to_dtype_and_repr():
    m = fusedbn.FusedBatchNorm2d(3)
    m.to(torch.float64)
    assert m.weight.dtype == torch.float64 and m.running_var.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    y = m(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert "3" in repr(m) and "eps=1e-05" in repr(m)
