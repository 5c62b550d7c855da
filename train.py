"""Entry point: `composer train.py yamls/<run>.yaml [key=value ...]`.

A YAML with `stages:` runs the DarwinLM chain (data -> database -> search -> train -> eval -> export);
a plain llm-foundry train YAML runs foundry's train loop (with our algorithms/callbacks registered).
"""

import sys

from darwinlm_foundry.stages.chain import main

if __name__ == '__main__':
    main(sys.argv[1:])
