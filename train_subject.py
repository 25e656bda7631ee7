#!/usr/bin/env python
"""Personalize Infinity-2B on a few photos of one subject (ARBooth). Same as `arbooth train-subject`.

    python train_subject.py --subject subjects/my_dog --class-noun dog \\
        --model-ckpt weights/infinity_2b_reg.pth --vae-ckpt weights/infinity_vae_d32_reg.pth --t5 weights/flan-t5-xl
    python train_subject.py --tiny --subject ../shared/vico/brown_dog --class-noun dog steps=3

Run with --help for every option; config keys are in arbooth/recipes/subject_config.py.
"""
import sys

from arbooth.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-subject", *sys.argv[1:]]))
