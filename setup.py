"""Build and install interest_kernels.

Install with the project's torch already present and no build isolation, so the
extension compiles against that torch (and never pulls another one):

    pip install --no-build-isolation -e .
"""
from setuptools import find_packages, setup

setup(
    name="interest_kernels",
    version="0.1.0",
    description="Fused Triton/C++/CUDA kernels for the user-interest layers of CTR models (DIN, DIEN, DMIN)",
    python_requires=">=3.10",
    packages=find_packages(include=["interest_kernels", "interest_kernels.*"]),
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"]},
)
