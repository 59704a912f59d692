"""sdzero_pl: SD-Zero (arXiv 2604.12002) with PyTorch Lightning.

Glossary (used everywhere, see docs/method.md): ``prompt`` (x, rendered with the chat template), ``answer`` (a),
``completion`` / ``init`` (y), ``reward`` (r), ``control`` (P_r), ``revision`` (y_revised).
"""

__version__ = "0.1.0"
