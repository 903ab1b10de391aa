"""towerann: the retrieval stage of a two-tower recommender, at inference time."""

__version__ = "0.1.0"
