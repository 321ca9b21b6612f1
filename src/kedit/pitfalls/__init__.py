"""Pitfalls of knowledge editing (Li et al., 2024): knowledge conflict and distortion."""
