"""The built-in toy worlds and tiny models: a world of shapes, its tokenizer, pretraining of the shipped toy
base, its loaders and report, tiny random models with the released architectures (no weights needed), and
the class-conditional toy world with its shipped tiny class VAR and toy feature extractor (class_*.py)."""
