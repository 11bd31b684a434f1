"""Built-in training recipes (YAML): minilm-cpu (the offline default), qwen3-0.6b and gemma3-270m (paper scale)."""
