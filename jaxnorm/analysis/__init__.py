"""Analysis tools built on jaxnorm's public API: measurements behind the notebooks.

`invariance_table` measures Table 1 of Ba, Kiros & Hinton (2016): how much
each transformation of the weights or the data changes the output of a layer
normalized by batch, weight, layer or RMS normalization. This package only
uses `jaxnorm`'s public names; `import jaxnorm` does not import it.
"""

from jaxnorm.analysis._invariance import (
    METHODS,
    PAPER_TABLE,
    TRANSFORMATIONS,
    invariance_table,
    normalized_output,
    transform,
)

__all__ = [
    "METHODS",
    "PAPER_TABLE",
    "TRANSFORMATIONS",
    "invariance_table",
    "normalized_output",
    "transform",
]
