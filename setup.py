"""Builds one C++ (and, where possible, CUDA) extension per folder of csrc/.

csrc/<name>/*.cpp becomes the module ``sparsekern._C_<name>``; csrc/<name>/*.cu
joins it only when a CUDA toolkit AND a CUDA build of torch are both present.
Separate modules keep rebuilds incremental and let one product's extension fail
without taking the others down. Build without isolation so the torch already
installed is the one compiled against:

    pip install --no-build-isolation -e .

Each built module is also kept in build/ext-cache/ under a hash of everything that
goes into it (csrc/, this file, the compiler and its flags, the torch and Python
versions): a second install of the same sources, e.g. the README's second command
after its first, copies it instead of compiling again (pip builds in a fresh
temporary folder each time, so the compiler's own incremental build cannot help).
"""
import glob
import hashlib
import os
import platform
import shutil
import sys

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


class CachedBuildExtension(BuildExtension):
    """torch's BuildExtension, reusing a module built before from identical inputs."""

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        cached = os.path.join(HERE, "build", "ext-cache", f"{ext.name}-{self._input_hash(ext)}.so")
        if os.path.exists(cached):
            print(f"{ext.name}: unchanged inputs, reusing {os.path.relpath(cached, HERE)}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(cached, target)
            return
        super().build_extension(ext)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        shutil.copyfile(target, cached + ".part")
        os.replace(cached + ".part", cached)  # never a half-written module under the final name

    def _input_hash(self, ext):
        digest = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*"), recursive=True)) + [__file__]:
            if os.path.isfile(path):
                digest.update(os.path.relpath(path, HERE).encode())
                digest.update(open(path, "rb").read())
        compiler = getattr(self.compiler, "compiler_so", None)
        environment = [os.environ.get(k, "") for k in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CPPFLAGS")]
        for part in (ext.name, ext.sources, ext.extra_compile_args, ext.extra_link_args, ext.include_dirs,
                     compiler, environment, torch.__version__, sys.version, platform.machine()):
            digest.update(repr(part).encode())
        return digest.hexdigest()[:20]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": CachedBuildExtension.with_options(use_ninja=True)},
)
