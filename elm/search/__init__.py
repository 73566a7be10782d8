"""Search-time analysis and selection: PCA width scores, CKA head pruning, architecture choice."""
