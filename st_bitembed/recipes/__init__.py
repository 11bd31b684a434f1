"""Built-in training recipes (YAML): minilm-cpu (the offline default), minilm-cpu-long (about an hour on a CPU),
qwen3-0.6b and gemma3-270m (paper scale), gemma3-270m-cpu."""
