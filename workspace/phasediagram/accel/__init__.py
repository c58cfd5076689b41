"""Acceleration: the ensemble form of the model families, lockstep Hessian products, fused batch norm."""
