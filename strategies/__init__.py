"""Method strategies: Flower ``Strategy`` subclasses, one per method, on ``strategies.base``.
They import their method's contract (``contracts``) and never a client."""
