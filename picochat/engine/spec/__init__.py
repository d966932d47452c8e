"""Speculative decoding's building blocks: the n-gram proposer, the rejection sampler that verifies
drafts against the target's distribution, and the per-request controller of how many to draft.
The engine loop wires them together; nothing here runs a model."""
