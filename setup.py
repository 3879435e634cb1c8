"""Build and install interest_kernels.

Install with the project's torch already present and no build isolation, so the
extension compiles against that torch (and never pulls another one):

    pip install --no-build-isolation -e .

This compiles the C++ operators into ``interest_kernels._C`` (the MBA sparse optimiser
updates, registered as ``torch.ops.interest_kernels.*``). The CUDA kernels are added
when torch was built with CUDA and ``nvcc`` is found (CUDA_HOME); otherwise the
extension holds the CPU kernels only. ``INTEREST_KERNELS_NO_EXTENSION=1`` installs the
pure-Python package (the MBA ops then fall back to their reference implementation).
"""
import glob
import os

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("INTEREST_KERNELS_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    csrc = "csrc"
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    # at::parallel_for expands to OpenMP pragmas in the headers when torch uses OpenMP.
    openmp = "OpenMP" in torch.__config__.parallel_info()
    cxx = ["-O3"] + (["-fopenmp"] if openmp else [])
    link = ["-fopenmp"] if openmp else []
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = extension(
        "interest_kernels._C",
        sources + ([os.path.join(csrc, "mba_cuda.cu")] if with_cuda else []),
        extra_compile_args={"cxx": cxx, **({"nvcc": ["-O3"]} if with_cuda else {})},
        extra_link_args=link,
        depends=glob.glob(os.path.join(csrc, "*.h")),
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="interest_kernels",
    version="0.1.0",
    description="Fused Triton/C++/CUDA kernels for the user-interest layers of CTR models (DIN, DIEN, DMIN)",
    python_requires=">=3.10",
    packages=find_packages(include=["interest_kernels", "interest_kernels.*"]),
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "plots": ["matplotlib"],
                    "onnx": ["onnx", "onnxscript", "onnxruntime"],
                    # GPU machines (CUDA fbgemm-gpu); CPU: pip install --no-deps -r requirements-distributed.txt
                    "distributed": ["torchrec==1.8.0", "fbgemm-gpu==1.8.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
