"""ImageNet entry point: data (LMDB or ImageFolder), the converter and the training recipe."""
