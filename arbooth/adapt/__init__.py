"""Adaptation methods: FFT, LoRA, LNTuning (class-conditional) and selective tuning (ARBooth)."""
from arbooth.adapt.finetuned import load_finetuned
from arbooth.adapt.methods import METHODS, count_parameters, merge_adapters, prepare_for_method

__all__ = ["METHODS", "count_parameters", "load_finetuned", "merge_adapters", "prepare_for_method"]
