"""`proalign demo`: the whole method on the embedded emoji benchmark (pipeline.py), its evaluation
sets (evalsets.py), claims with error bars (claims.py), the search example (examples.py) and the
report (report.py). Not part of the library core: `import proalign` never imports it."""
from .pipeline import DEFAULT_CONFIG, run_demo

__all__ = ["DEFAULT_CONFIG", "run_demo"]
