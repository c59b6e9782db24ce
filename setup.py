"""Build and install loramix_kernels.

The C++ extension ``loramix_kernels._C`` (native CPU kernels from csrc/) is built with
torch.utils.cpp_extension; install with ``pip install --no-build-isolation -e .`` so that it
compiles against the torch already installed.
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "loramix_kernels._C",
            sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="loramix_kernels",
    version="0.1.0",
    description="GPU kernels for LoRA-Mixer routed multi-LoRA projections and Mirror speculative decoding",
    packages=find_packages(include=["loramix_kernels", "loramix_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
