"""The quantization engine: GPTQ itself and the block streaming that feeds it.

engine (the paper's outer loop over decoder blocks), calibration (the passes through a block that
build the Hessians), solver (the algorithm: pure functions on tensors), quantizer (the uniform
grid), hessian_inverse, gptaq and fp_stream (GPTAQ's full-precision stream), activation_pool, mixed,
allocate and sensitivity (--target-bits), distributed (torchrun), workdir and checksums (the work
directory a run solves into), dry_run (--dry-run), phases (where a run's time goes).

May import: format, model, kernels, settings, errors. Never the API, the CLI or the hub.
"""
