"""Model engine: Llama-family decoder, loaders, tokenizer, tensor parallelism."""
