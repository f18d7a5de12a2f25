"""The base layer the methods stand on: run-config schema and typed settings, seeding, wire
state and torch helpers, results files, checkpoints and the name registry.

It imports ``compression`` and nothing above it (no Flower wiring, no method).
"""
