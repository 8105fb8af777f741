"""Evaluation: the shapes analyzer, FID, the CLIP scorers, the papers' prompt sets, records and tables, generation."""
