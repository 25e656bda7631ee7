"""Adaptation methods: FFT, LoRA, LNTuning (class-conditional) and selective tuning (ARBooth)."""
