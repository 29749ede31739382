"""megatron-r1: DeepSeek-R1 recipe on a Megatron-style 5D-parallel runtime."""
__version__ = "0.1.0"
