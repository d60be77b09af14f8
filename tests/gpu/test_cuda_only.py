"""What only a GPU can show: run-to-run determinism of the CUDA kernels (same input, same bits),
capture and replay of a whole training step in a CUDA graph, and an input of more than 2^31
elements. Every test here is marked `cuda` (skipped, with the reason, where there is none)."""
import copy

import pytest
import torch
from torch import nn

import fusedbn
import sanitizer_cases as sc

pytestmark = pytest.mark.cuda
ops = torch.ops.fusedbn

# One case per reduction path (planes, packed, rows, (N, C)) and the fused activation kernels.
DETERMINISM_CASES = ["planes_tail_bf16", "planes_f32", "packed_vec_f32", "packed_scalar_bf16",
                     "rows_vec_f32", "rows_scalar_bf16", "rows_nc_f16", "rows_3d_bf16",
                     "sync_channels_last_bf16", "act_relu_mask_contiguous_f32",
                     "act_silu_bf16", "module_bn2d_cumulative_f32"]


@pytest.mark.parametrize("name", DETERMINISM_CASES)
def test_same_input_same_bits(name):
    """No floating-point atomics (bn_reduce_kernels.cuh): three runs on the same input give
    bitwise equal results."""
    fn = sc.CASES[name]
    dev = torch.device("cuda")
    first = {k: v.detach().clone() for k, v in fn(dev).items()}
    for run in range(2):
        again = fn(dev)
        for k, v in first.items():
            assert torch.equal(again[k], v), "%s %s differs in run %d" % (name, k, run + 2)


def test_large_batch_same_bits():
    """A reduction split over many CTAs (ResNet-50's first layer at batch 64), twice."""
    x = torch.randn(64, 64, 112, 112, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.rand(64, device="cuda") + 0.5
    b = torch.randn(64, device="cuda")
    results = []
    for _ in range(2):
        y, mean, invstd, var = ops.forward_train(x, w, b, 1e-5)
        dx, dw, db = ops.backward(dy, x, w, mean, invstd, True, [True, True, True])
        results.append((y, mean, invstd, var, dx, dw, db))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


class Net(nn.Module):
    """conv -> FusedBatchNorm2d -> ReLU -> conv -> FusedBatchNormAct2d(+ residual, ReLU) -> head,
    channels_last, the second batch norm with momentum=None (1/num_batches_tracked on device)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = fusedbn.FusedBatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = fusedbn.FusedBatchNormAct2d(16, momentum=None, activation="relu")
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h), h)
        return self.head(h.mean((2, 3)))


def _train_step(model, opt, x, target):
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    return loss


def test_cuda_graph_training_step():
    """A training step (forward, backward, SGD step, running-statistics updates) captured once and
    replayed on new data gives what the same steps give eagerly (a value baked in at capture,
    such as momentum=None's 1/num_batches_tracked, would show in the running statistics)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        _graph_training_step()


def _graph_training_step():
    torch.manual_seed(0)
    model = Net().cuda().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(8, 3, 12, 12, device="cuda").contiguous(
        memory_format=torch.channels_last), torch.randint(0, 10, (8,), device="cuda"))
        for _ in range(6)]
    static_x, static_t = (t.clone() for t in batches[0])

    # Warm-up on a side stream (as torch.cuda.graphs asks), then capture; both are real steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            static_x.copy_(batches[i][0])
            static_t.copy_(batches[i][1])
            _train_step(model, opt, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_x.copy_(batches[2][0])
    static_t.copy_(batches[2][1])
    with torch.cuda.graph(graph):
        static_loss = _train_step(model, opt, static_x, static_t)
    losses = [None, None, float(static_loss)]  # the capture itself does not run the step
    for i in range(2, 6):
        static_x.copy_(batches[i][0])
        static_t.copy_(batches[i][1])
        graph.replay()
        losses[i] = float(static_loss)
    # Eagerly: the same six steps (the capture ran none).
    eager_losses = [float(_train_step(eager, opt_e, *b)) for b in batches]
    torch.cuda.synchronize()
    for i in range(2, 6):
        assert abs(losses[i] - eager_losses[i]) <= 1e-5 * max(1.0, abs(eager_losses[i])), (
            "step %d: loss %g in the graph, %g eagerly" % (i, losses[i], eager_losses[i]))
    for (name, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name
    assert int(model.bn2.num_batches_tracked) == 6


def test_cuda_graph_replays_follow_new_input():
    """Replays read the static input each time: two different inputs give two outputs, each
    equal to the eager result on that input."""
    bn = fusedbn.FusedBatchNorm2d(8).cuda()
    x = torch.randn(4, 8, 16, 16, device="cuda")
    ref = copy.deepcopy(bn)
    bn(x)
    ref(x)  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = bn(x)
    for scale in (1.0, 3.0):
        x.copy_(torch.randn_like(x) * scale + scale)
        g.replay()
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


# (N, C, H, W) with N*C*H*W > 2^31; bfloat16: 4.3 GB a tensor, about 30 GB at the peak.
HUGE = (16, 8, 4096, 4100)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements(layout):
    """Training forward and backward of a bfloat16 input of 2.15e9 elements: the statistics
    against a float64 reduction of each channel, y and dx against the float32 formulas, all
    elements (the last ones lie beyond 2^31)."""
    n = HUGE[0] * HUGE[1] * HUGE[2] * HUGE[3]
    assert n > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 40 << 30:
        pytest.skip("needs 40 GB of free GPU memory, %.1f GB free" % (free / 2 ** 30))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator(device="cuda")
    g.manual_seed(0)
    C = HUGE[1]
    x = torch.empty(HUGE, device="cuda", dtype=torch.bfloat16, memory_format=fmt)
    dy = torch.empty_like(x)
    for c in range(C):  # a different mean and scale per channel
        x[:, c].normal_(float(c) - 3.0, 0.5 + 0.25 * c, generator=g)
        dy[:, c].normal_(0.1 * c, 1.0, generator=g)
    w = torch.linspace(0.5, 2.0, C, device="cuda")
    b = torch.linspace(-1.0, 1.0, C, device="cuda")
    y, mean, invstd, var = ops.forward_train(x, w, b, 1e-5)
    dx, dw, db = ops.backward(dy, x, w, mean, invstd, True, [True, True, True])
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    M = n // C
    try:
        for c in range(C):
            xc = x[:, c].double()
            m64 = xc.mean()
            v64 = (xc - m64).square().mean()
            assert abs(mean[c].item() - m64.item()) <= 1e-5 * (abs(m64.item()) + v64.sqrt().item())
            assert abs(var[c].item() - v64.item()) <= 1e-5 * v64.item()
            del xc
            xhat = (x[:, c].float() - mean[c]) * invstd[c]
            y_exp = xhat * w[c] + b[c]
            err = (y[:, c].float() - y_exp).abs()
            tol = 2 ** -7 * y_exp.abs() + 1e-3  # one bfloat16 ulp of the result
            assert bool((err <= tol).all()), "channel %d: y off by %.3g" % (c, err.max())
            dyc = dy[:, c].float()
            db64 = dyc.double().sum()
            dw64 = (dyc.double() * xhat.double()).sum()
            scale_b, scale_w = dyc.abs().double().sum(), (dyc * xhat).abs().double().sum()
            assert abs(db[c].item() - db64.item()) <= 1e-5 * scale_b.item()
            assert abs(dw[c].item() - dw64.item()) <= 1e-5 * scale_w.item()
            dx_exp = w[c] * invstd[c] * (dyc - float(db64) / M - xhat * float(dw64) / M)
            err = (dx[:, c].float() - dx_exp).abs()
            tol = 2 ** -7 * dx_exp.abs() + 1e-3 * (w[c] * invstd[c]).abs()
            assert bool((err <= tol).all()), "channel %d: dx off by %.3g" % (c, err.max())
            del xhat, y_exp, dyc, dx_exp, err, tol
    finally:
        del x, dy, y, dx
        torch.cuda.empty_cache()
