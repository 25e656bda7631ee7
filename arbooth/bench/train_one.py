"""`python -m arbooth.bench.train_one CONFIG.yaml`: the subject recipe on one resolved config, in a child
process of `arbooth bench-subject` under a launcher (arbooth/bench/subject.py `_train_in_child`)."""
from __future__ import annotations

import logging
import sys

from arbooth.bench.subject import _train_here
from arbooth.config import load_config
from arbooth.errors import ArboothError
from arbooth.recipes.subject_config import SubjectTrainConfig

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        _train_here(load_config(SubjectTrainConfig, sys.argv[1]))
    except ArboothError as e:
        print(f"arbooth bench-subject (training): error: {e}", file=sys.stderr)
        sys.exit(2)
