"""The built-in toy world and tiny models: a world of shapes, its tokenizer, pretraining of the shipped toy
base, its loaders and report, and tiny random models with the released architectures (no weights needed)."""
