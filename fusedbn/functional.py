"""fusedbn.functional.batch_norm: torch.nn.functional.batch_norm's signature and semantics on the
fusedbn kernels. Its errors start with "fusedbn.functional.batch_norm: " (torch's own checks keep
torch's words)."""
from . import ops

ENTRY = "fusedbn.functional.batch_norm"


def verify_batch_size(size):
    """torch's check that training sees more than one value per channel (same message)."""
    size_prods = size[0]
    for s in size[2:]:
        size_prods *= s
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


def check_eps(eps, use_batch_stats):
    """torch's eps checks (same messages)."""
    if use_batch_stats and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_running_stats(running_mean, running_var, use_batch_stats):
    """running_mean and running_var both given or both None; given in evaluation mode. (The
    modules call this too: they put their own name in front of the message.)"""
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{ENTRY}: running_mean and running_var must both be tensors or both be "
            f"None, got running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}")
    if not use_batch_stats and running_mean is None:  # torch's exception type and wording
        raise RuntimeError(
            f"running_mean must be defined in evaluation mode ({ENTRY} with "
            "training=False normalizes with running_mean and running_var)")


def _batch_norm_below_2d(input, weight, bias):
    """torch's F.batch_norm on an input without a channel dimension: an empty 1-D input has
    nothing to normalize and comes back as a copy of itself (times weight[0], plus bias[0], when
    given: torch's empty-input path, whose gradient chain this keeps); anything else is refused.
    (torch raises RuntimeError or IndexError there, depending on the other arguments.)"""
    if input.dim() == 1 and input.numel() == 0:
        output = input.clone()
        if weight is not None:
            output = output * weight[0]
        if bias is not None:
            output = output + bias[0]
        return output
    raise RuntimeError(
        "fusedbn.batch_norm: input must have at least 2 dimensions (N, C, *), got "
        f"{input.dim()}D input of shape {tuple(input.shape)} (an empty 1-D input is the one "
        "exception: it is returned as an empty output)")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalization over the channel dimension (dim 1) of an (N, C, *) input.

    Same signature and semantics as torch.nn.functional.batch_norm: with training=True the batch
    statistics normalize the input and, when given, running_mean/running_var are updated in place
    (running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance);
    with training=False the running statistics are used.
    """
    if training:
        verify_batch_size(input.size())
    check_eps(eps, training)
    check_running_stats(running_mean, running_var, training)
    if input.dim() < 2:
        return _batch_norm_below_2d(input, weight, bias)
    if momentum is None:
        raise TypeError(f"{ENTRY}: momentum must be a float, not None (momentum=None, "
                        "the cumulative average, needs the modules' num_batches_tracked)")
    try:
        return ops.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                              eps)
    except (RuntimeError, TypeError, ValueError) as e:
        ops.name_entry_point(e, ENTRY)
        raise
