"""Data: safe image reading, class-labelled datasets, subject folders (the toy world is in arbooth.toy)."""
