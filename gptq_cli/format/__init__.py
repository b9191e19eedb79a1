"""The GPTQ checkpoint format (SPEC §2): bit packing, one quantized linear, the quantization config, and
checkpoint directories on disk."""
from gptq_cli.format.checkpoint import quantized_to_tensors, read_quant_config, read_tensors, write_checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.quantized import QuantizedWeight

__all__ = ["QuantConfig", "QuantizedWeight", "quantized_to_tensors", "read_quant_config", "read_tensors",
           "write_checkpoint"]
