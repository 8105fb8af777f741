"""SwiftBrush in JAX: image-free one-step distillation of Stable Diffusion."""

import os as _os

# transformers is used for the CLIP tokenizer only (every model here is Flax, torch is not a dependency); imported
# without torch it logs "PyTorch was not found ..." (older versions: "None of PyTorch, TensorFlow >= 2.0, or Flax
# have been found ..."). Set here, before any module of the package can import transformers, this silences
# transformers' advisory lines (logger.warning_advice) and nothing else: its warnings and errors still print.
# setdefault: a value the user set is kept.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
