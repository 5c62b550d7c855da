"""darwinlm-foundry: DarwinLM structured pruning as an llm-foundry / Composer plugin."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'llm-foundry==0.22.0',
    'mosaicml==0.32.1',
    'torch==2.7.0',
    'transformers>=4.51,<4.52',
    'mosaicml-streaming>=0.12,<0.13',
    'lm-eval>=0.4.8',
    'omegaconf>=2.3',
    'safetensors>=0.4',
    'matplotlib>=3.7',
    'sentencepiece',  # the Llama-2 tokenizer (embedded demo) converts from its SentencePiece model
    'protobuf',
    'setuptools<80',  # llm-foundry imports pkg_resources
    'gguf>=0.10',  # model stages that start from a GGUF file (transformers' GGUF loader)
    'psutil',  # the eval stage's memory budget (available memory)
]

setup(
    name='darwinlm-foundry',
    version='0.1.0',
    description='DarwinLM training-aware evolutionary structured pruning for llm-foundry / Composer',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    # callbacks/ lives at the top of the repo (design card) but installs as a subpackage.
    packages=find_packages(include=['darwinlm_foundry', 'darwinlm_foundry.*']) + ['darwinlm_foundry.callbacks'],
    package_dir={
        'darwinlm_foundry': 'darwinlm_foundry',
        'darwinlm_foundry.callbacks': 'callbacks',
    },
    package_data={'darwinlm_foundry': ['assets/*', 'assets/**/*']},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': ['pytest>=7', 'pytest-timeout', 'pytest-xdist']},
    entry_points={
        'llmfoundry_models': [
            'darwinlm = darwinlm_foundry.modeling.composer_model:ComposerDarwinLM',
        ],
        'llmfoundry_algorithms': [
            'darwinlm_prune = darwinlm_foundry.algorithms.darwinlm_prune:DarwinLMPrune',
        ],
        'llmfoundry_callbacks': [
            'darwinlm_search = darwinlm_foundry.callbacks.evolutionary_search:DarwinLMSearch',
        ],
    },
)
