"""torch.nn modules over the fused ops, with converters from DeepCTR-Torch and FuxiCTR."""
