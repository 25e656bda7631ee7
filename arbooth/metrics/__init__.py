"""Evaluation metrics: subject fidelity (DINO, CLIP-I, CLIP-T, PRES, DIV) and class quality (FID, precision, recall)."""
