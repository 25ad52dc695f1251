"""Training: gradient loops for EfficientAD and the FADeR-style model, one-pass Gaussian fitting,
teacher distillation, checkpoints and the bundle written at the end. Imports torch."""
