"""Deployment: a fine-tuned run leaves minibert in the formats people serve.

    hf.py           `export --to hf`: the transformers class that matches the task, or a refusal
    onnx_export.py  `export --to onnx [--optimize]`: encoder, pooling and head as one ONNX graph
    onnx_run.py     an exported graph run by onnxruntime where minibert's TaskModel stands
                    (`predict --backend onnx`)
    int8.py         int8 Linear layers: minibert's reference math and onnxruntime's fast path
    commands.py     the `minibert export` and `minibert quantize` commands
"""
