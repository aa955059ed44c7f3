"""``Linear8bitLt``: LLM.int8 linear layer (int8 matmul with 16-bit outlier columns)."""

import torch
from torch import nn

from .frozen_op_call import call_op
from .int8params import Int8Params
from .layer_input import check_input, check_weight_shape
from .weight_loading import LoadsQuantizedWeight


class MatmulLtState:
    """The bitsandbytes ``state`` of a ``Linear8bitLt``: settings, plus views of its weight's int8 tensors."""

    CxB = None  # legacy tiled layouts are not used

    def __init__(self, module: "Linear8bitLt", threshold: float, has_fp16_weights: bool,
                 memory_efficient_backward: bool) -> None:  # fmt: skip
        self._module = module
        self.threshold = threshold
        self.has_fp16_weights = has_fp16_weights
        self.memory_efficient_backward = memory_efficient_backward
        self.force_no_igemmlt = False
        self._outliers: torch.Tensor | None = None

    @property
    def CB(self) -> torch.Tensor | None:
        weight = self._module.weight
        return weight.CB if isinstance(weight, Int8Params) else None

    @property
    def SCB(self) -> torch.Tensor | None:
        weight = self._module.weight
        return weight.SCB if isinstance(weight, Int8Params) else None

    @property
    def idx(self) -> torch.Tensor | None:
        """Indices of the outlier input columns of the last eager forward (threshold > 0), else None."""
        return None if self._outliers is None else self._outliers.nonzero().view(-1)


class _TrainableInt8Linear(torch.autograd.Function):
    """LLM.int8 forward of a float weight quantized on the fly; 16-bit gradients for input and weight."""

    @staticmethod
    def forward(x, weight, bias, threshold):
        CB, SCB, _ = torch.ops.lowbit.int8_vectorwise_quant(weight.detach(), 0.0)
        return torch.ops.lowbit.int8_mixed_linear(x, CB, SCB, bias, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _grad_outliers):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_weight, grad_bias, None


class Linear8bitLt(LoadsQuantizedWeight, nn.Linear):
    """``y = x @ W.T + b`` with LLM.int8: int8 rows times the int8 weight, outlier columns in 16-bit.

    ``has_fp16_weights=False`` stores ``W`` as an ``Int8Params`` (inference, input gradients still flow);
    ``True`` keeps a trainable float ``W`` that is quantized in each forward. ``threshold > 0`` turns on
    outlier decomposition; ``state.force_no_igemmlt = True`` uses dequantize + 16-bit matmul instead.
    """

    _state_roots = ("weight", "SCB", "weight_format")

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        memory_efficient_backward: bool = False,
        threshold: float = 0.0,
        index=None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(input_features, output_features, bias, device)
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 disables outlier decomposition), got {threshold}")
        self.state = MatmulLtState(self, threshold, has_fp16_weights, memory_efficient_backward)
        self.index = index
        self.weight = Int8Params(self.weight.data, requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        weight, state = self.weight, self.state
        if isinstance(weight, Int8Params):
            weight = Int8Params.checked(weight, f"{type(self).__name__}.weight")
            check_weight_shape(self, weight.shape)
            if state.force_no_igemmlt:
                return nn.functional.linear(x, weight.dequantize().to(x.dtype), _cast(self.bias, x.dtype))
            bias = self.bias
            out, outliers = call_op(torch.ops.lowbit.int8_mixed_linear.default, x, weight.CB, weight.SCB, bias,
                                    state.threshold, grad_inputs=(x, bias))  # fmt: skip
        elif weight.is_floating_point():
            out, outliers = _TrainableInt8Linear.apply(x, weight, self.bias, state.threshold)
        else:
            raise TypeError(f"Linear8bitLt.weight must be an Int8Params or a float Parameter, got {weight.dtype}")
        if state.threshold > 0 and not torch.compiler.is_compiling():
            state._outliers = outliers
        return out

    def _weight_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(weight, Int8Params):
            return {}  # a float weight is saved as it is
        return {"weight": weight.CB, "SCB": weight.SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}

    def _decode_weight(self, state_dict: dict, prefix: str, device: torch.device, current: torch.Tensor):
        """The checkpoint's weight: int8 with its ``SCB``, or float (quantized unless the weights are fp16)."""
        data, SCB = state_dict[prefix + "weight"], state_dict.get(prefix + "SCB")
        weight_format = state_dict.get(prefix + "weight_format")
        if weight_format is not None and int(weight_format) != 0:
            raise ValueError(f"weight_format must be 0 (row-major; tiled layouts are gone), got {int(weight_format)}")
        expected = tuple(current.shape)  # a row shard under FSDP2
        if tuple(data.shape) != expected:
            raise ValueError(f"checkpoint weight has shape {list(data.shape)}, expected {list(expected)}")
        data = data.to(device)
        if SCB is not None:
            if self.state.has_fp16_weights:
                raise ValueError("cannot load an int8 checkpoint (with SCB) into a layer with has_fp16_weights=True")
            dtype = current.meta.dtype if isinstance(current, Int8Params) else torch.float16
            return Int8Params.from_quantized(data, SCB.to(device), dtype=dtype)
        if not data.is_floating_point():
            raise ValueError(f"checkpoint weight is {data.dtype} without an SCB entry: its row scales are missing")
        return data if self.state.has_fp16_weights else Int8Params(data, has_fp16_weights=False)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
