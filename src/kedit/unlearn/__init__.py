"""Unlearning: methods that make a model forget a set of (prompt, answer) items while keeping
another, each returning a reversible weight-delta `Edit`, and the metrics that score them.

Unlearning methods have their own registry (`kedit.unlearn.registry`): they take forget and
retain sets, not `EditRequest`s, so the editing methods' contract does not run them; theirs is
in tests/test_unlearn_contract.py.
"""
