"""Training through a p2pml node, with torch: models, data sets, the training loop."""

from __future__ import annotations
