from setuptools import setup

# kernels/ is installed as ``tnllm_kernels``: PyPI's popular ``kernels`` package (Hugging Face's kernel hub,
# which transformers probes for) must never be shadowed.
setup(
    name="tnllm",
    version="0.1.0",
    description="TransNormerLLM as a fairseq / Metaseq plugin, with Triton lightning attention",
    packages=["tnllm_plugin", "tnllm_kernels", "tnllm_kernels.lightning_attention", "tnllm_kernels.srmsnorm",
              "tnllm_kernels.fused_cross_entropy", "tnllm_kernels.gla_decode"],
    package_dir={"tnllm_kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch"],
    extras_require={"triton": ["triton"]},
)
