"""SGD with momentum and coupled weight decay, applied in place to ONNX Runtime's own parameter and gradient buffers.

Why not ORT's optimizer: 1.19.2's SGD has no momentum, and its AdamW kernel (which can stand in: betas (mu, 1), eps 1)
keeps two weight-sized moments per trainable tensor where SGD needs one (64 MB on ResNet-18's grow-3), plus an
optimizer session. Here the momentum lives in the gradient accumulation buffer itself, so SGD costs no memory beyond
the gradients:

- the training graph *adds* each micro-batch's gradient into its buffer (InPlaceAccumulatorV2) unless
  `lazy_reset_grad` was called, in which case the next micro-batch overwrites it;
- at a step the buffer holds mu * v_prev + g (the round's first step: g, after the reset), so adding wd * p gives
  torch's momentum buffer v; then p -= lr * v, and the buffer is scaled by mu, ready for the next batch's gradients.

That is torch.optim.SGD(momentum=mu, weight_decay=wd, dampening=0, nesterov=False) step for step.

The arrays are numpy views of ORT's CPU buffers (their data pointers); each keeps its tensor alive. OrtStage makes new
ones whenever it reloads its state.
"""

from __future__ import annotations

import ctypes

import numpy as np


def tensor_view(value, shape: list[int]) -> np.ndarray:
    """A float32 view (no copy) of an ORT CPU tensor (a C-level OrtValue, as CheckpointState's parameters hold). The
    view keeps `value`, and with it the tensor's buffer, alive: it never points into freed memory."""
    n = int(np.prod(shape))
    if value.data_type() != "tensor(float)" or int(np.prod(value.shape())) != n:
        raise ValueError(f"expected a float32 tensor of {n} elements, got {value.data_type()} {value.shape()}")
    buffer = (ctypes.c_float * n).from_address(value.data_ptr())
    buffer.owner = value
    return np.ctypeslib.as_array(buffer).reshape(shape)


class BufferSGD:
    """step(lr) on (parameter, gradient buffer) view pairs, a chunk at a time through one small scratch array (a
    weight-sized temporary would add the largest tensor's size to the peak: 9 MB on ResNet-18's last block)."""

    CHUNK = 1 << 18  # floats (1 MB)

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], momentum: float, weight_decay: float):
        self.pairs = [(p.reshape(-1), g.reshape(-1)) for p, g in pairs]  # views of the same buffers, flat
        self.momentum, self.weight_decay = momentum, weight_decay
        self._scratch = np.empty(self.CHUNK, np.float32)

    def step(self, lr: float) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging round is refused after it (check_finite)
            self._step(lr)

    def _step(self, lr: float) -> None:
        for p_all, g_all in self.pairs:
            for i in range(0, p_all.size, self.CHUNK):
                p, g = p_all[i:i + self.CHUNK], g_all[i:i + self.CHUNK]
                tmp = self._scratch[:p.size]
                if self.weight_decay:
                    g += np.multiply(p, self.weight_decay, out=tmp)
                p -= np.multiply(g, lr, out=tmp)
                g *= self.momentum  # momentum 0: the buffer is cleared; the next micro-batch's gradient lands alone
