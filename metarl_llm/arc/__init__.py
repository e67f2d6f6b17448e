"""Layer 4: ARC. Grid augmentations (:mod:`.augment`), augmented voting (:mod:`.vote`) and
per-problem test-time training with LoRA (:mod:`.ttt`).
"""
