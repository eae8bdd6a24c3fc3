"""A third-party lmsae plugin: the tied-weights ReLU SAE (decoder = encoder transpose)."""
