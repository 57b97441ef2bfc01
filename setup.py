"""Packaging for pfl_mpi.

torch is deliberately unpinned so that a GPU user's CUDA build is kept; CI installs the CPU
wheel first (see the Makefile's TORCH_SPEC). The MPI runtime comes from the ``mpi`` extra
(MPICH from PyPI); on a cluster, leave it out and build mpi4py against the site's MPI.
"""

from setuptools import find_packages, setup

setup(
    name="pfl_mpi",
    version="0.1.0",
    description="Personalised federated learning simulator for HPC clusters, on MPI collectives",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pfl_mpi", "pfl_mpi.*"]),
    install_requires=[
        "mpi4py>=4.0",
        "torch>=2.1",
        "numpy>=1.24",
        "h5py>=3.8",
        "pyyaml>=6.0",
        "pydantic>=2.5",
        "tqdm>=4.60",
        "scikit-learn>=1.3",
        "mnist1d>=0.0.2",
        "matplotlib>=3.7",
    ],
    extras_require={
        "mpi": ["mpich>=4.1"],
        "tensorboard": ["tensorboard>=2.12"],  # pfl-mpi export --tensorboard
        "hf": ["datasets>=2.14"],  # data.name: hf (Hugging Face data sets from local disk)
        "test": ["pytest>=8", "pytest-mpi>=0.6", "ruff>=0.5", "tensorboard>=2.12", "datasets>=2.14"],
    },
    entry_points={"console_scripts": ["pfl-mpi=pfl_mpi.cli:main"]},
)
