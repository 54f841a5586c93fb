"""Fused and chunked kernels of the model, each beside a plain reference it is tested against."""

from foundry_dbrx.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

__all__ = ['linear_cross_entropy', 'linear_cross_entropy_reference']
