"""Evaluation and serving: from a trained model to numbers and search hits.

Owns: retrieval metrics (`metrics`), embedding and ranking a split (`evaluate`), the search index
(`search`) and the demo report (`report`).
Must not touch: training state, the optimizer or the loader's resume position.
"""
