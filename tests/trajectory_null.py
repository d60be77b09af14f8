"""The null experiment behind test_f64_trajectory's ResNet expected failure (not a test: run it).

On fusedbn's trajectory, a third float32 model is given fusedbn's weights, buffers and batch at
every step: torch's network with every batch norm computed in float64 and rounded to float32 once
(output, and through autograd every gradient) -- as exact as a float32 batch norm can be. It is
measured by the trajectory test's rule against torch NCHW, exactly as fusedbn is. Where this exact
batch norm fails the rule too, the rule is not measuring the batch norm but the float32 rounding of
the rest of the network.

    PYTHONPATH=$PWD python tests/trajectory_null.py [resnet|mlp|cl_cnn]   (about 15 s for resnet)
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import test_f64_trajectory as T


class ExactBatchNorm(nn.Module):
    """A training-mode batch norm in float64, rounded to float32; the state of the batch norm it
    replaces (same parameters, buffers and state_dict keys)."""

    def __init__(self, bn):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.momentum, self.eps = bn.momentum, bn.eps

    def forward(self, x):
        mean, var = self.running_mean.double(), self.running_var.double()
        y = F.batch_norm(x.double(), mean, var, self.weight.double(), self.bias.double(), True,
                         self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self.num_batches_tracked += 1
        return y.float()


def exact(model):
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, ExactBatchNorm(child))
        else:
            exact(child)
    return model


def main(kind):
    torch.set_num_threads(1)
    _, trajectories = T._trajectories(
        kind, lambda base: {"exact": (exact(T.copy.deepcopy(base)), None)})
    for name, trajectory in trajectories.items():
        for run in ("fusedbn", "exact"):
            failures, ratios = T._out_of_bound(trajectory.steps, run)
            r = torch.tensor(ratios)
            print("%s %s trajectory, %-7s: %d of %d quantities out of bound; err / err(torch NCHW) "
                  "above the floor (%d): median %.3g, 90%% %.3g, 99%% %.3g, max %.3g" % (
                      kind, name, run, len(failures), len(trajectory.steps) *
                      len(trajectory.steps[0]), len(r), float(r.median()),
                      float(r.quantile(0.9)), float(r.quantile(0.99)), float(r.max())))
            for line in failures:
                print("    " + line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet")
