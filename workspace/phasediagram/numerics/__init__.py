"""Numerical building blocks: Hessian-vector products, Lanczos and trace estimators, weight perturbations."""
