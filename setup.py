"""foundry-dbrx: train DBRX-class mixture-of-experts models with Composer and LLM Foundry."""

import os

from setuptools import find_packages, setup

_here = os.path.dirname(os.path.abspath(__file__))


def _entry_points() -> dict:
    # The one table of registrations lives in foundry_dbrx/registry.py (no imports at module level).
    scope: dict = {}
    with open(os.path.join(_here, 'foundry_dbrx', 'registry.py')) as f:
        exec(f.read(), scope)
    return scope['ENTRY_POINTS']


with open(os.path.join(_here, 'README.md')) as f:
    long_description = f.read()

setup(
    name='foundry-dbrx',
    version='0.1.0',
    description='Train DBRX-class mixture-of-experts language models with Composer and LLM Foundry',
    long_description=long_description,
    long_description_content_type='text/markdown',
    packages=find_packages(include=['foundry_dbrx', 'foundry_dbrx.*']),
    python_requires='>=3.10',
    install_requires=[
        'llm-foundry==0.22.0',
        'mosaicml>=0.32,<0.33',
        'mosaicml-streaming>=0.12,<0.13',
        'torch==2.7.0',
        'transformers>=4.51,<4.52',
        'omegaconf>=2.3',
        'tiktoken>=0.7',
        'bpe-openai==0.1.4',  # ships the cl100k_base file: the tokenizer works offline
        'setuptools<81',  # llm-foundry imports pkg_resources
        'tqdm',
        'mlflow>=2.22,<3',  # the shipped YAMLs log to a local MLflow store
        'matplotlib>=3.8',  # foundry-dbrx plot
    ],
    extras_require={
        # MegaBlocks and grouped_gemm compile CUDA code: install on a machine with a GPU and nvcc.
        'gpu': ['megablocks==0.10.0', 'grouped-gemm==0.3.0'],
        'test': ['pytest', 'pytest-timeout', 'moto[server,s3]', 'boto3'],
    },
    entry_points=_entry_points(),
)
