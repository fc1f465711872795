"""What one timed call does in each mode.

fwd: a training forward with autograd recording (x requires grad, so the graph is built as in training);
bwd: the backward of one such forward, replayed with retain_graph; train: forward + backward;
infer: an eval forward under torch.no_grad (merged or not, as the provider was left).
"""

import torch

MODES = ("fwd", "bwd", "train", "infer")


def make_step(module, x, dy, *, mode):
    """(step, grads): `step()` runs one call of `mode`; `grads` are the tensors whose .grad the timer clears
    between calls so that backward never accumulates.

    x: (M, K) and dy: (M, N), shared by every provider; x is not modified (a detached alias requires grad).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "infer":
        module.eval()

        def infer():
            with torch.no_grad():
                return module(x)

        return infer, ()
    module.train()
    x = x.detach().requires_grad_(True)
    grads = [x] + [param for param in module.parameters() if param.requires_grad]
    if mode == "fwd":
        return (lambda: module(x)), grads
    if mode == "train":
        return (lambda: module(x).backward(dy)), grads
    y = module(x)
    return (lambda: y.backward(dy, retain_graph=True)), grads


def training_forward(module, x):
    """(forward, x_grad): a training forward on a grad-requiring alias of x, for counting saved bytes."""
    module.train()
    x = x.detach().requires_grad_(True)
    return (lambda: module(x)), x
