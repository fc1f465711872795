"""Where Triton cannot be imported (macOS, Windows, a minimal install) lorafuse still imports and trains."""

import os
import subprocess
import sys
import textwrap


def test_layer_works_when_triton_is_missing():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import lorafuse

        layer = lorafuse.FusedLoRALinear(12, 6, r=2, lora_dropout=0.1)
        torch.nn.init.normal_(layer.lora_B)
        x = torch.randn(5, 12, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None
        layer.eval()
        expected = lorafuse.reference.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                                  scaling=layer.scaling)
        torch.testing.assert_close(layer(x), expected)
        assert "lorafuse.kernels" not in sys.modules or sys.modules["lorafuse.kernels"] is None
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
