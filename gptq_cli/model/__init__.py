"""Model access: finding a model and streaming its weights (modelio), the architectures' block
structure (arch, moe), and the quantized model for inference (quant_linear, loader).

May import: format, kernels, errors.
"""
