"""fp64 numpy references for the Python tests, written from the seeds' formulas without optd's
code (tests/python and tests/deploy import it)."""

import numpy as np

KELLER = (3.4445, -4.7750, 2.0315)


def newton_schulz(x, steps=5, eps=1e-7):
    """Keller's zeropower_via_newtonschulz5 in fp64: transposed when tall, X/(‖X‖+eps), then
    X ← aX + (bA + cA²)X with A = XXᵀ."""
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = KELLER
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x
