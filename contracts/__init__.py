"""What both halves of a method agree on, in one place below both.

A method's *contract* module holds its settings (a typed, frozen ``core.settings.Settings``
group built once from the run config: keys, defaults, help, cross-key checks), the names of the
fit-config entries and metrics its client and strategy exchange, and how it lays the model out on
the wire (which codec, which split of the wire state, which bit positions). ``clients/`` and
``strategies/`` import their method's contract; they never import each other.
"""
