"""Official PyTorch SAM checkpoints read without torch: the `.pth` reader, key table, converter.

The command lines over it (`python -m weights_conversion sam ...`) live in `weights_conversion/`.
"""
