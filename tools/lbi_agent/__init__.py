"""Training of the LBI-FL bit-width agent: environment, learning pieces, the training command.

The client only runs a trained agent (``clients.lbi_agent``); everything here is offline tooling.
"""
