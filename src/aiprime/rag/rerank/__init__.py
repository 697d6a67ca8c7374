"""Re-ranking: a learned feature re-ranker (logistic regression), a neural cross-encoder,
MMR for diversity, and a stack that composes them.

Submodules are imported on use: the cross-encoder pulls in torch, the others do not.
"""
