"""x86 backend: PyTorch's quantized CPU kernels (fbgemm / oneDNN)."""
