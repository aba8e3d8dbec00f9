"""Bytes (bottom layer): bit packing, the sparse codes and the entropy coder (rANS, the
``constriction`` library) the checkpoint stores. Numpy, torch and constriction only.
"""
