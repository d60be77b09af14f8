"""Second derivatives of batch norm: an autograd Function whose forward is fusedbn's backward op and
whose backward is the analytic backward-of-backward, written in differentiable torch ops.

Per channel, with M values, x_hat = (x - mean) * s, s = invstd and the first backward
    train: dx = w s (g - mean(g) - x_hat mean(g x_hat)),  dw = sum(g x_hat),  db = sum(g)
    eval:  dx = w s g   (s, mean from the running statistics, constants)
the gradients of  L = <ggx, dx> + ggw * dw + ggb * db  with respect to g, x and w are:
    train:
      dL/dg = ggb + ggw x_hat + w s P(ggx),     P(v) = v - mean(v) - x_hat mean(v x_hat)
      dL/dw = s sum(ggx (g - mean(g) - x_hat mean(g x_hat)))
      dL/dx = centre(s dL/dx_hat - s^2 x_hat / M * dL/ds)   (x_hat and s both depend on x)
        with A = sum(g x_hat), B = sum(ggx x_hat),
        dL/dx_hat = ggw g - (w s / M)(ggx A + g B)              (s held fixed)
        dL/ds     = w sum(ggx (g - mean(g))) - w A B / M + sum(dL/dx_hat x_hat) / s
    eval:
      dL/dg = ggb + ggw x_hat + w s ggx,   dL/dw = s sum(ggx g),   dL/dx = ggw s g
"""
import torch

_ops = torch.ops.fusedbn


def _channel_view(t, ndim):
    """A (C,) tensor shaped to broadcast against (N, C, *)."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(ndim):
    return [0] + list(range(2, ndim))


class BatchNormBackward(torch.autograd.Function):
    """(dx, dw, db) = backward(g, x, w) as a differentiable function of g, x and w."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, mean, invstd, train, mask):
        dx, dw, db = _ops.backward(grad_output, input, weight, mean, invstd, train, mask)
        ctx.save_for_backward(grad_output, input, weight, mean, invstd)
        ctx.train = train
        ctx.mask = mask
        return dx, dw, db

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        g, x, weight, mean, invstd = ctx.saved_tensors
        mask = ctx.mask
        nd = x.dim()
        dims = _reduce_dims(nd)
        M = x.numel() // x.shape[1] if x.shape[1] else 0
        acc = mean.dtype
        gf, xf = g.to(acc), x.to(acc)
        s = _channel_view(invstd, nd)
        w = _channel_view(weight.to(acc), nd) if weight is not None else torch.ones_like(s)
        xhat = (xf - _channel_view(mean, nd)) * s
        # Absent upstream gradients are zeros (and outputs not produced by the op are ignored).
        ggx = ggx.to(acc) if mask[0] and ggx is not None and ggx.numel() else torch.zeros_like(xf)
        ggw = (_channel_view(ggw.to(acc), nd) if mask[1] and ggw is not None and ggw.numel()
               else torch.zeros_like(s))
        ggb = (_channel_view(ggb.to(acc), nd) if mask[2] and ggb is not None and ggb.numel()
               else torch.zeros_like(s))

        def csum(t):
            return t.sum(dims, keepdim=True)

        if ctx.train and M > 0:
            g_mean = csum(gf) / M
            A = csum(gf * xhat)
            B = csum(ggx * xhat)
            P_ggx = ggx - csum(ggx) / M - xhat * B / M
            d_g = ggb + ggw * xhat + w * s * P_ggx
            d_w = s * csum(ggx * (gf - g_mean - xhat * A / M))
            d_xhat = ggw * gf - (w * s / M) * (ggx * A + gf * B)
            d_s = w * csum(ggx * (gf - g_mean)) - w * A * B / M + csum(d_xhat * xhat) / s
            d_u = d_xhat * s - d_s * s * s * xhat / M
            d_x = d_u - csum(d_u) / M
        else:
            d_g = ggb + ggw * xhat + w * s * ggx
            d_w = s * csum(ggx * gf)
            d_x = ggw * s * gf
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        return (d_g.to(g.dtype) if need_g else None,
                d_x.to(x.dtype) if need_x else None,
                d_w.reshape(-1).to(weight.dtype) if need_w and weight is not None else None,
                None, None, None, None)
