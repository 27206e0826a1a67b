"""Data: the modality registry, multi-modal folders, augmentations, the resumable loader, synthetic scenes."""
