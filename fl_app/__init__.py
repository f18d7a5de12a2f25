"""The wiring: Flower's ServerApp and ClientApp, the method registry and run-config schema,
datasets and models. Above the methods; below the tools."""
