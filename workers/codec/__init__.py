"""Bytes (bottom layer): bit packing and the sparse codes the checkpoint stores. Numpy and
torch only.
"""
