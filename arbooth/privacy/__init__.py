"""Differential privacy: DP-SGD through Opacus, augmentation multiplicity, audit."""
