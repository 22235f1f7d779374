"""``python -m audiostream.processors``: print docs/steps.md from the declared schemas."""

from audiostream.processors import registry
from audiostream.processors.params import render_steps_doc

print(render_steps_doc(registry), end="")
