"""The bottom layer: pure functions and autograd ops on tensors and arrays (quantizers, rounding,
bit packing, bit decomposition, binarizers, clipping, low-bit layers) and every wire format as a
``compression.codec.Codec``. No Flower import, nothing above it."""
