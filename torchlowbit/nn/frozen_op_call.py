"""Calling a ``lowbit`` op in eager mode without its Python autograd kernel when no gradient can flow.

``torch.library.register_autograd`` installs the ops' autograd kernel in Python. With nothing to differentiate it
only redispatches below autograd, at ~4 us a call on the host: per layer and decode step, the largest share of a
quantized layer's host overhead over ``nn.Linear``. Compiled code is unaffected (it never runs this path).
"""

import torch


def call_op(op, *args, grad_inputs: tuple[torch.Tensor | None, ...]):
    """``op(*args)``; below the autograd keys when no tensor of ``grad_inputs`` can receive a gradient."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    ):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
