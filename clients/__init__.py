"""Method clients: Flower ``NumPyClient`` subclasses, one per training family, on ``clients.base``.
They import their method's contract (``contracts``) and never a strategy."""
