"""darwinlm_foundry: DarwinLM training-aware evolutionary structured pruning for llm-foundry / Composer.

Importing the package is cheap; Composer / llm-foundry are imported only by the modules that need them
(the algorithm, the callbacks and the foundry model entry).
"""

__version__ = '0.1.0'
