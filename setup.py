from pathlib import Path

from setuptools import setup

setup(
    name="lorafuse",
    version="0.1.0",
    description="Triton-accelerated LoRA: a fused FusedLoRALinear layer for PyTorch",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["lorafuse", "lorafuse.kernels", "lorafuse.bench", "lorafuse.integrations", "lorafuse.distributed",
              "lorafuse.inspect"],
    package_dir={"lorafuse": "lorafuse", "lorafuse.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "tqdm>=4.60",
        # Patterns from adapter files are matched with a timeout (lorafuse/patterns.py); `re` has none.
        "regex>=2022.1.18",
        # Triton ships for Linux only; elsewhere the layer runs its PyTorch path. 3.3 is the oldest whose
        # compiler takes every kernel (make check-triton-versions, docs/gpu_compile.md): 3.2 aborts on sm_90.
        "triton>=3.3; platform_system == 'Linux'",
    ],
    extras_require={
        # megatron-core: its real Column/RowParallelLinear are tested where it imports (Linux).
        "test": ["pytest>=7", "transformers>=4.40", "peft>=0.10", "ruff>=0.4",
                 "megatron-core>=0.16,<0.17; platform_system == 'Linux'"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.5", "peft>=0.10"],
    },
    entry_points={"console_scripts": ["lorafuse-bench=lorafuse.bench:main"]},
)
