"""Builds one C++ (and, where possible, CUDA) extension per folder of csrc/.

csrc/<name>/*.cpp becomes the module ``sparsekern._C_<name>``; csrc/<name>/*.cu
joins it only when a CUDA toolkit AND a CUDA build of torch are both present.
Separate modules keep rebuilds incremental and let one product's extension fail
without taking the others down. Build without isolation so the torch already
installed is the one compiled against:

    pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_available_for_build():
    if os.environ.get("SPARSEKERN_NO_CUDA") == "1":
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extensions():
    with_cuda = _cuda_available_for_build()
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is torch's own choice (its headers need it)
    extensions = []
    for folder in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
        if not os.path.isdir(folder):
            continue
        name = os.path.basename(folder)
        only = os.environ.get("SPARSEKERN_ONLY")  # e.g. SPARSEKERN_ONLY=bsr rebuilds one extension
        if only and name not in only.split(","):
            continue
        rel = lambda p: os.path.relpath(p, HERE)  # noqa: E731 - setuptools wants relative paths
        cpp = sorted(rel(p) for p in glob.glob(os.path.join(folder, "*.cpp")))
        cu = sorted(rel(p) for p in glob.glob(os.path.join(folder, "*.cu")))
        if not cpp and not (cu and with_cuda):
            continue
        common = dict(
            name=f"sparsekern._C_{name}",
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_link_args=["-fopenmp"],
        )
        if cu and with_cuda:
            extensions.append(CUDAExtension(
                sources=cpp + cu,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                **common,
            ))
        else:
            extensions.append(CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **common))
    return extensions


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
