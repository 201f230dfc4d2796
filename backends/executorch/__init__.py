"""ExecuTorch .pte backend with XNNPACK delegation."""
