"""hpcdd: model-parallel training of CNN-DNNs by domain decomposition.

Klawonn, Lanser, Weber: "A Domain Decomposition-Based CNN-DNN Architecture for Model Parallel
Training" (SISC 2024) and "Model Parallel Training and Transfer Learning for CNNs by Domain
Decomposition" (2024).
"""

__version__ = "0.1.0"
