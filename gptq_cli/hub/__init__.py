"""`gptq push`: the checks before an upload, the upload through huggingface_hub (push) and the
generated model card (modelcard).

May import: format, inspection, errors.
"""
