"""The built-in toy worlds and the tiny models pretrained on them (see docs/toy.md)."""
