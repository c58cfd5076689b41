"""Datasets: MNIST-1D (generated locally) and CIFAR-10 (read from a local folder)."""
