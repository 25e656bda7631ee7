"""Jobs: what a command runs that is more than one training loop (train, then evaluate and report), built
from the recipes below and the toy world; commands above call them. Not a training loop itself, so not in
`arbooth/recipes/`."""
