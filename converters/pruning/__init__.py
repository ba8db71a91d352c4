"""Weight pruning for edge-sdk: magnitude/activation sparsity, 2:4 patterns, structured and layer pruning."""
