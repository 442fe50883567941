"""Fused kernels (Triton, with plain-PyTorch fallbacks), imported as ``autopar.kernels``.

Data flow: the fused-attention pass substitutes these ops into captured graphs;
the runtime executes them. Importing autopar never requires Triton. Kernels land
with their own issue; this package exists now so that the import name is fixed
(``autopar.kernels``, never a bare ``kernels``).
"""
