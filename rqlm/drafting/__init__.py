"""Lossless drafting: a latent LM (or a draft head) proposes tokens that a causal LM verifies.

- `verification`: `generate_with_drafter` and the candidate generators transformers' assisted decoding calls;
- `speed`: the drafting benchmark (`rqlm bench --drafting`).
"""
