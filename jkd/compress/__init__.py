"""Compression of a trained student: magnitude pruning (while distilling) and int8 quantization."""
