"""Model side: hyper-parameters, loaders (GGUF, HF safetensors), tokenizer and chat template, the transformer, quantization."""
