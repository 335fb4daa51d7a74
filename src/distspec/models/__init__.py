"""The model engine: a Llama-family decoder in plain PyTorch with a static KV cache, loaders
(HF safetensors directories, GGUF files and their converted cache), the tokenizer, tensor
parallelism as weight slicing, CPU weight packing and step timing.
Imports nothing else of distspec."""
